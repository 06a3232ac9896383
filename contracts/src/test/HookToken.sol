// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice Receives a callback on every token transfer to it (ERC-777-style hook).
interface ITokenReceiver {
    function onTokenReceived(address from, uint256 amount) external;
}

/// @title HookToken (test only)
/// @notice An ERC-20 that calls `onTokenReceived` on a contract recipient after each transfer, so a
/// malicious recipient can try to re-enter the contract that pays it. Anyone can mint.
contract HookToken is ERC20 {
    constructor() ERC20("Hook Token", "HOOK") {}

    /// @notice Mints `amount` to `to` (test token: no access control).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (from != address(0) && to.code.length > 0) {
            // Contracts without the hook (the escrow, the registries) still receive tokens.
            try ITokenReceiver(to).onTokenReceived(from, value) {} catch {}
        }
    }
}
