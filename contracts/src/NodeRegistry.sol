// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title NodeRegistry
/// @notice Inference node operators stake OPEN, name their record-signing key, their public endpoint (so
/// dApps discover nodes on chain) and their fee per token. Stake leaves through an unbonding delay longer
/// than the settlement challenge window, so it can still be slashed for a batch committed before. Only the
/// settlement contract can slash, and take stake to cover a payer shortfall the node let happen.
contract NodeRegistry is ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct FeeVersion {
        uint64 since;
        uint96 feePerToken;
    }

    struct Node {
        address signer;
        uint64 unbondingEnd;
        bool registered;
        uint128 stake;
        uint128 unbonding;
        string endpoint;
    }

    IERC20 public immutable token;
    /// @notice The only account allowed to slash (UsageSettlement).
    address public immutable settlement;
    uint256 public immutable minStake;
    uint64 public immutable unbondingDelay;
    /// @notice Delay between a fee change and the moment it takes effect (seconds).
    uint64 public immutable noticePeriod;

    mapping(address node => Node) private _nodes;
    mapping(address node => FeeVersion[]) private _fees;

    event NodeRegistered(address indexed node, address indexed signer, string endpoint, uint96 feePerToken, uint256 stake);
    event NodeStakeAdded(address indexed node, uint256 amount, uint256 stake);
    event NodeSignerChanged(address indexed node, address indexed signer);
    event NodeEndpointChanged(address indexed node, string endpoint);
    event NodeFeeScheduled(address indexed node, uint32 indexed version, uint64 since, uint96 feePerToken);
    event NodeUnbondingStarted(address indexed node, uint256 amount, uint256 unbonding, uint64 unbondingEnd);
    event NodeUnbondedWithdrawn(address indexed node, uint256 amount);
    event NodeSlashed(address indexed node, uint256 amount, address indexed recipient);
    event NodeStakeCovered(address indexed node, uint256 amount, uint256 stake);
    event NodeCoverReturned(address indexed node, uint256 amount, uint256 stake);

    error NodeRegistryAlreadyRegistered(address node);
    error NodeRegistryNotRegistered(address node);
    error NodeRegistryStakeBelowMinimum(uint256 stake, uint256 minStake);
    error NodeRegistryZeroSigner();
    error NodeRegistryZeroAmount();
    error NodeRegistryInsufficientStake(uint256 stake, uint256 amount);
    error NodeRegistryStillUnbonding(uint64 unbondingEnd, uint64 now_);
    error NodeRegistryNothingUnbonding();
    error NodeRegistryNotSettlement(address caller);

    modifier onlySettlement() {
        if (msg.sender != settlement) revert NodeRegistryNotSettlement(msg.sender);
        _;
    }

    constructor(IERC20 token_, address settlement_, uint256 minStake_, uint64 unbondingDelay_, uint64 noticePeriod_) {
        token = token_;
        settlement = settlement_;
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        noticePeriod = noticePeriod_;
    }

    /// @notice Registers the caller as a node with an initial stake (pulled with `transferFrom`).
    /// @param signer Key the node signs usage records with; may also commit batches for the node.
    /// @param endpoint Public URL of the node's OpenAI-compatible API.
    /// @param feePerToken The node's fee, OPEN wei per (input or output) token; in force immediately.
    /// @param stake Initial stake, at least `minStake`.
    function register(address signer, string calldata endpoint, uint96 feePerToken, uint128 stake)
        external
        nonReentrant
    {
        Node storage node = _nodes[msg.sender];
        if (node.registered) revert NodeRegistryAlreadyRegistered(msg.sender);
        if (signer == address(0)) revert NodeRegistryZeroSigner();
        if (stake < minStake) revert NodeRegistryStakeBelowMinimum(stake, minStake);
        node.registered = true;
        node.signer = signer;
        node.stake = stake;
        node.endpoint = endpoint;
        _fees[msg.sender].push(FeeVersion({since: uint64(block.timestamp), feePerToken: feePerToken}));
        emit NodeRegistered(msg.sender, signer, endpoint, feePerToken, stake);
        token.safeTransferFrom(msg.sender, address(this), stake);
    }

    /// @notice Adds `amount` to the caller's stake.
    function addStake(uint128 amount) external nonReentrant {
        Node storage node = _registered(msg.sender);
        if (amount == 0) revert NodeRegistryZeroAmount();
        node.stake += amount;
        emit NodeStakeAdded(msg.sender, amount, node.stake);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Replaces the caller's record-signing key.
    function setSigner(address signer) external {
        Node storage node = _registered(msg.sender);
        if (signer == address(0)) revert NodeRegistryZeroSigner();
        node.signer = signer;
        emit NodeSignerChanged(msg.sender, signer);
    }

    /// @notice Replaces the caller's public endpoint URL.
    function setEndpoint(string calldata endpoint) external {
        Node storage node = _registered(msg.sender);
        node.endpoint = endpoint;
        emit NodeEndpointChanged(msg.sender, endpoint);
    }

    /// @notice Schedules a new fee per token, in force `noticePeriod` seconds from now.
    /// @return version Index of the new fee version.
    function setFee(uint96 feePerToken) external returns (uint32 version) {
        _registered(msg.sender);
        uint64 since = uint64(block.timestamp) + noticePeriod;
        _fees[msg.sender].push(FeeVersion({since: since, feePerToken: feePerToken}));
        version = uint32(_fees[msg.sender].length - 1);
        emit NodeFeeScheduled(msg.sender, version, since, feePerToken);
    }

    /// @notice Moves `amount` of the caller's stake to unbonding; the whole unbonding amount becomes
    /// withdrawable `unbondingDelay` seconds from now. Below `minStake` the node can no longer commit.
    function unbond(uint128 amount) external {
        Node storage node = _registered(msg.sender);
        if (amount == 0) revert NodeRegistryZeroAmount();
        if (amount > node.stake) revert NodeRegistryInsufficientStake(node.stake, amount);
        node.stake -= amount;
        node.unbonding += amount;
        node.unbondingEnd = uint64(block.timestamp) + unbondingDelay;
        emit NodeUnbondingStarted(msg.sender, amount, node.unbonding, node.unbondingEnd);
    }

    /// @notice Withdraws the caller's unbonded stake once the unbonding delay has passed.
    function withdrawUnbonded() external nonReentrant {
        Node storage node = _registered(msg.sender);
        uint128 amount = node.unbonding;
        if (amount == 0) revert NodeRegistryNothingUnbonding();
        if (block.timestamp < node.unbondingEnd) {
            revert NodeRegistryStillUnbonding(node.unbondingEnd, uint64(block.timestamp));
        }
        node.unbonding = 0;
        emit NodeUnbondedWithdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Takes up to `amount` from the node's stake, then from its unbonding stake, and sends it to
    /// the settlement contract. Only callable by the settlement contract (on a proven fraud).
    /// @return slashed The amount actually taken.
    function slash(address nodeAddress, uint256 amount) external onlySettlement nonReentrant returns (uint256 slashed) {
        Node storage node = _nodes[nodeAddress];
        uint256 fromStake = amount < node.stake ? amount : node.stake;
        uint256 rest = amount - fromStake;
        uint256 fromUnbonding = rest < node.unbonding ? rest : node.unbonding;
        // Both parts are bounded by the uint128 fields they come from.
        node.stake -= uint128(fromStake);
        node.unbonding -= uint128(fromUnbonding);
        slashed = fromStake + fromUnbonding;
        emit NodeSlashed(nodeAddress, slashed, settlement);
        if (slashed > 0) token.safeTransfer(settlement, slashed);
    }

    /// @notice Takes `amount` from the node's stake (not its unbonding stake) and sends it to the settlement
    /// contract, which pays with it a payer's charge the payer's escrow could not. Only settlement; reverts
    /// when the stake is too small (the commit that needed it reverts with it).
    function cover(address nodeAddress, uint128 amount) external onlySettlement nonReentrant {
        Node storage node = _nodes[nodeAddress];
        if (amount > node.stake) revert NodeRegistryInsufficientStake(node.stake, amount);
        node.stake -= amount;
        emit NodeStakeCovered(nodeAddress, amount, node.stake);
        token.safeTransfer(settlement, amount);
    }

    /// @notice Credits `amount` back to the node's stake after the settlement contract has sent it here:
    /// a voided batch returns what the node covered. Only settlement.
    function returnCover(address nodeAddress, uint128 amount) external onlySettlement {
        Node storage node = _nodes[nodeAddress];
        node.stake += amount;
        emit NodeCoverReturned(nodeAddress, amount, node.stake);
    }

    /// @notice The node's record: signer key, staked and unbonding amounts, unbonding end, endpoint.
    function nodeOf(address nodeAddress)
        external
        view
        returns (bool registered, address signer, uint128 stake, uint128 unbonding, uint64 unbondingEnd, string memory endpoint)
    {
        Node storage node = _nodes[nodeAddress];
        return (node.registered, node.signer, node.stake, node.unbonding, node.unbondingEnd, node.endpoint);
    }

    /// @notice Whether the node may commit batches: registered with at least `minStake` staked.
    function isActive(address nodeAddress) public view returns (bool) {
        Node storage node = _nodes[nodeAddress];
        return node.registered && node.stake >= minStake;
    }

    /// @notice What settlement needs at commit time: whether the node is active, its signer key and stake.
    function commitInfo(address nodeAddress) external view returns (bool active, address signer, uint128 stake) {
        Node storage node = _nodes[nodeAddress];
        return (isActive(nodeAddress), node.signer, node.stake);
    }

    /// @notice Total slashable amount (stake plus unbonding) of a node.
    function slashableOf(address nodeAddress) external view returns (uint256) {
        Node storage node = _nodes[nodeAddress];
        return uint256(node.stake) + node.unbonding;
    }

    /// @notice Number of fee versions of a node.
    function feeCount(address nodeAddress) external view returns (uint32) {
        return uint32(_fees[nodeAddress].length);
    }

    /// @notice The node's fee per token in force at `timestamp`.
    /// @return found False when the node is unknown or `timestamp` precedes its registration.
    function feeAt(address nodeAddress, uint64 timestamp) external view returns (bool found, uint96 feePerToken) {
        FeeVersion[] storage history = _fees[nodeAddress];
        uint256 low = 0;
        uint256 high = history.length;
        // Binary search for the first version with since > timestamp.
        while (low < high) {
            uint256 mid = (low + high) / 2;
            if (history[mid].since > timestamp) high = mid;
            else low = mid + 1;
        }
        if (low == 0) return (false, 0);
        return (true, history[low - 1].feePerToken);
    }

    function _registered(address nodeAddress) private view returns (Node storage node) {
        node = _nodes[nodeAddress];
        if (!node.registered) revert NodeRegistryNotRegistered(nodeAddress);
    }
}
