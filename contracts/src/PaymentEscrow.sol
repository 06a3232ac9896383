// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title PaymentEscrow
/// @notice Payers deposit OPEN into one account per (payer, node): only that node's batches can ever
/// collect from it, so spending at another node or another node's commit cannot short this one.
/// A withdrawal is announced ({requestWithdrawal}) and paid after `thawPeriod`; thawing funds stay
/// collectable until they are withdrawn, and `thawPeriod` outlasts `maxRequestTtl + maxCommitDelay`, so
/// what a node saw available when it served is still there when it must commit.
/// Payers authorise signer keys (a dApp backend signs requests for its payer); a revocation takes effect
/// after `noticePeriod`, which also outlasts `maxRequestTtl + maxCommitDelay`.
/// The settlement contract collects a batch's charges at commit into its pending pot ({collect}), then
/// pays them out ({settle}) or puts them back ({refund}). Each account also counts what the node's
/// committed batches have charged the payer (`collected`), which never exceeds the highest cumulative cap
/// the payer signed for that node: the account is a one-way payment channel from payer to node.
contract PaymentEscrow is ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    /// @dev `balance` and `collected` share a slot: a commit touches one slot per payer. `thawing` is what
    /// the payer announced; what it can take is `min(thawing, balance)` (a commit that lowers the balance
    /// below it lowers what thaws without a second slot write).
    struct Account {
        uint128 balance;
        uint128 collected;
        uint128 thawing;
        uint64 thawEnd;
    }

    struct SignerAuth {
        uint64 since;
        uint64 until;
    }

    IERC20 public immutable token;
    /// @notice The only account allowed to collect, settle and refund (UsageSettlement).
    address public immutable settlement;
    uint64 public immutable thawPeriod;
    /// @notice Delay between a signer revocation and the moment it takes effect (seconds).
    uint64 public immutable noticePeriod;

    /// @notice Collected charges of pending batches (held here until settled or refunded).
    uint256 public totalCollected;

    mapping(address payer => mapping(address node => Account)) private _accounts;
    mapping(address payer => mapping(address signer => SignerAuth)) private _signers;

    event Deposited(address indexed payer, address indexed node, address from, uint256 amount);
    event WithdrawalRequested(address indexed payer, address indexed node, uint256 thawing, uint64 thawEnd);
    event Withdrawn(address indexed payer, address indexed node, uint256 amount);
    event SignerAuthorized(address indexed payer, address indexed signer, uint64 since);
    event SignerRevoked(address indexed payer, address indexed signer, uint64 until);
    event Refunded(address indexed payer, address indexed node, uint256 amount, uint256 taken);
    event Settled(uint256 amount);

    error PaymentEscrowZeroAmount();
    error PaymentEscrowZeroNode();
    error PaymentEscrowInsufficientBalance(address payer, address node, uint256 balance, uint256 amount);
    error PaymentEscrowStillThawing(uint64 thawEnd, uint64 now_);
    error PaymentEscrowNothingThawing(address payer, address node);
    error PaymentEscrowZeroSigner();
    error PaymentEscrowSignerAlreadyAuthorized(address payer, address signer);
    error PaymentEscrowSignerNotAuthorized(address payer, address signer);
    error PaymentEscrowNotSettlement(address caller);
    error PaymentEscrowOverCap(address payer, address node, uint256 collected, uint256 cumulativeCap);

    modifier onlySettlement() {
        if (msg.sender != settlement) revert PaymentEscrowNotSettlement(msg.sender);
        _;
    }

    constructor(IERC20 token_, address settlement_, uint64 thawPeriod_, uint64 noticePeriod_) {
        token = token_;
        settlement = settlement_;
        thawPeriod = thawPeriod_;
        noticePeriod = noticePeriod_;
    }

    /// @notice Deposits `amount` OPEN (pulled with `transferFrom`) into the caller's account for `node`.
    function deposit(address node, uint128 amount) external nonReentrant {
        _deposit(msg.sender, node, amount);
    }

    /// @notice Deposits `amount` OPEN from the caller into `payer`'s account for `node`.
    function depositFor(address payer, address node, uint128 amount) external nonReentrant {
        _deposit(payer, node, amount);
    }

    /// @notice Deposits with an EIP-2612 permit instead of a prior `approve`.
    function depositWithPermit(address node, uint128 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s);
        _deposit(msg.sender, node, amount);
    }

    /// @notice Announces a withdrawal of `amount` from the caller's account for `node`: it replaces any
    /// earlier announcement (0 cancels) and becomes withdrawable `thawPeriod` seconds from now. Thawing
    /// funds stay collectable by the node's batches until they are withdrawn.
    function requestWithdrawal(address node, uint128 amount) external {
        Account storage account = _accounts[msg.sender][node];
        if (amount > account.balance) {
            revert PaymentEscrowInsufficientBalance(msg.sender, node, account.balance, amount);
        }
        account.thawing = amount;
        account.thawEnd = amount == 0 ? 0 : uint64(block.timestamp) + thawPeriod;
        emit WithdrawalRequested(msg.sender, node, amount, account.thawEnd);
    }

    /// @notice Pays the caller the thawed part of its account for `node` (what is left of it) once the
    /// thaw period has passed.
    function withdraw(address node) external nonReentrant {
        Account storage account = _accounts[msg.sender][node];
        uint128 amount = _thawing(account);
        if (amount == 0) revert PaymentEscrowNothingThawing(msg.sender, node);
        if (block.timestamp < account.thawEnd) {
            revert PaymentEscrowStillThawing(account.thawEnd, uint64(block.timestamp));
        }
        account.balance -= amount;
        account.thawing = 0;
        account.thawEnd = 0;
        emit Withdrawn(msg.sender, node, amount);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Authorises `signer` to sign inference requests paid by the caller, from now on.
    /// A revoked signer cannot be authorised again (its past validity window must stay provable).
    function authorizeSigner(address signer) external {
        if (signer == address(0)) revert PaymentEscrowZeroSigner();
        SignerAuth storage auth = _signers[msg.sender][signer];
        if (auth.until != 0) revert PaymentEscrowSignerAlreadyAuthorized(msg.sender, signer);
        auth.since = uint64(block.timestamp);
        auth.until = type(uint64).max;
        emit SignerAuthorized(msg.sender, signer, auth.since);
    }

    /// @notice Revokes `signer`: from `noticePeriod` seconds on, nothing it signed can be committed.
    function revokeSigner(address signer) external {
        SignerAuth storage auth = _signers[msg.sender][signer];
        if (auth.until != type(uint64).max) revert PaymentEscrowSignerNotAuthorized(msg.sender, signer);
        auth.until = uint64(block.timestamp) + noticePeriod;
        emit SignerRevoked(msg.sender, signer, auth.until);
    }

    /// @notice Charges `payer` `amount` for `node`'s batch: what the node has collected from the payer, this
    /// charge included, must not exceed `cumulativeCap` (the payer's signed voucher, checked by the settlement);
    /// up to `amount` of the balance moves into the pending pot. Only settlement.
    /// @return taken `min(amount, balance)`; the settlement covers the rest from the node's stake.
    function collect(address payer, address node, uint128 amount, uint128 cumulativeCap)
        external
        onlySettlement
        returns (uint128 taken)
    {
        Account storage account = _accounts[payer][node];
        uint256 collected = uint256(account.collected) + amount;
        if (collected > cumulativeCap) revert PaymentEscrowOverCap(payer, node, collected, cumulativeCap);
        uint128 balance = account.balance;
        taken = amount < balance ? amount : balance;
        // taken <= balance; collected <= cumulativeCap < 2^128.
        unchecked {
            account.balance = balance - taken;
        }
        account.collected = uint128(collected);
        totalCollected += taken;
        // No event: the settlement's BatchCommitted (and PayerShort for a shortfall) says what was collected,
        // and one event per payer would cost ~1,900 gas each at commit.
    }

    /// @notice Undoes a voided batch's charge: `amount` no longer counts as collected and `taken` (what the
    /// escrow paid of it) goes back into the account. Only settlement.
    function refund(address payer, address node, uint128 amount, uint128 taken) external onlySettlement {
        Account storage account = _accounts[payer][node];
        account.collected -= amount;
        account.balance += taken;
        totalCollected -= taken;
        emit Refunded(payer, node, amount, taken);
    }

    /// @notice Sends `amount` of the pending pot to the settlement contract (a batch was finalized).
    function settle(uint256 amount) external onlySettlement nonReentrant {
        totalCollected -= amount;
        emit Settled(amount);
        token.safeTransfer(settlement, amount);
    }

    /// @notice A payer's account for one node: balance (thawing included), what of it thaws, the thaw end.
    function accountOf(address payer, address node)
        external
        view
        returns (uint128 balance, uint128 thawing, uint64 thawEnd)
    {
        Account storage account = _accounts[payer][node];
        return (account.balance, _thawing(account), account.thawEnd);
    }

    /// @notice What `node`'s committed, not voided batches have charged `payer` (never above the highest
    /// cumulative cap the payer signed for the node).
    function collectedOf(address payer, address node) external view returns (uint256) {
        return _accounts[payer][node].collected;
    }

    /// @notice When `signer` may sign for `payer`: [since, until). (0, 0) if never authorised.
    function signerOf(address payer, address signer) external view returns (uint64 since, uint64 until) {
        SignerAuth storage auth = _signers[payer][signer];
        return (auth.since, auth.until);
    }

    /// @notice Whether what `signer` signed for `payer` is valid at time `t`: the payer itself always is,
    /// another key if it was authorised at or before `t` and its revocation (if any) takes effect after `t`.
    function signerValidAt(address payer, address signer, uint64 t) external view returns (bool) {
        if (signer == payer) return true;
        SignerAuth storage auth = _signers[payer][signer];
        return auth.since <= t && t < auth.until;
    }

    function _thawing(Account storage account) private view returns (uint128) {
        return account.thawing < account.balance ? account.thawing : account.balance;
    }

    function _deposit(address payer, address node, uint128 amount) private {
        if (amount == 0) revert PaymentEscrowZeroAmount();
        if (node == address(0)) revert PaymentEscrowZeroNode();
        _accounts[payer][node].balance += amount;
        emit Deposited(payer, node, msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }
}
