// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {ITokenReceiver} from "./HookToken.sol";

/// @title ReentrantReceiver (test only)
/// @notice An attacker account: its owner makes it call anything, and when tokens arrive it replays a
/// configured call (e.g. the `claim` or `withdraw` that is paying it) up to `maxReentries` times,
/// recording whether each re-entry succeeded and the revert data of the last failure.
contract ReentrantReceiver is ITokenReceiver {
    address public immutable owner;
    address public reentryTarget;
    bytes public reentryData;
    uint256 public maxReentries;
    uint256 public attempts;
    uint256 public successes;
    bytes public lastError;

    error ReentrantReceiverNotOwner(address caller);
    error ReentrantReceiverCallFailed(bytes data);

    constructor() {
        owner = msg.sender;
    }

    /// @notice Performs an arbitrary call as this contract (owner only).
    function execute(address target, bytes calldata data) external returns (bytes memory) {
        if (msg.sender != owner) revert ReentrantReceiverNotOwner(msg.sender);
        (bool ok, bytes memory result) = target.call(data);
        if (!ok) revert ReentrantReceiverCallFailed(result);
        return result;
    }

    /// @notice Sets the call replayed on token receipt (owner only).
    function arm(address target, bytes calldata data, uint256 maxReentries_) external {
        if (msg.sender != owner) revert ReentrantReceiverNotOwner(msg.sender);
        reentryTarget = target;
        reentryData = data;
        maxReentries = maxReentries_;
    }

    /// @inheritdoc ITokenReceiver
    function onTokenReceived(address, uint256) external {
        if (attempts >= maxReentries || reentryTarget == address(0)) return;
        attempts += 1;
        (bool ok, bytes memory result) = reentryTarget.call(reentryData);
        if (ok) successes += 1;
        else lastError = result;
    }
}
