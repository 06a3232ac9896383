// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {PayerTotal} from "./UsageTypes.sol";

/// @title PaymentEscrow
/// @notice Payers deposit OPEN here and authorise signer keys (a dApp backend signs requests for its payer).
/// A withdrawal thaws for `thawPeriod` (longer than batch interval + challenge window) and stays chargeable
/// while it thaws, so a node that served a payer can still commit its batch. The settlement contract locks
/// a batch's charges when it is committed, then pays them out ({settle}) or refunds them ({refund}).
contract PaymentEscrow is ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct Account {
        uint128 balance;
        uint128 thawing;
    }

    struct SignerAuth {
        uint64 since;
        uint64 until;
    }

    IERC20 public immutable token;
    /// @notice The only account allowed to lock, settle and refund (UsageSettlement).
    address public immutable settlement;
    uint64 public immutable thawPeriod;
    /// @notice Delay between a signer revocation and the moment it takes effect (seconds).
    uint64 public immutable noticePeriod;

    /// @notice Sum of the charges of all committed, not yet finalized or voided batches.
    uint256 public totalLocked;

    mapping(address payer => Account) private _accounts;
    mapping(address payer => uint64) private _thawEnd;
    mapping(address payer => mapping(address signer => SignerAuth)) private _signers;

    event Deposited(address indexed payer, address indexed from, uint256 amount);
    event WithdrawalRequested(address indexed payer, uint256 amount, uint256 thawing, uint64 thawEnd);
    event Withdrawn(address indexed payer, address indexed to, uint256 amount);
    event SignerAuthorized(address indexed payer, address indexed signer, uint64 since);
    event SignerRevoked(address indexed payer, address indexed signer, uint64 until);
    event FundsLocked(uint256 amount, uint256 payers);
    event FundsSettled(uint256 amount);
    event FundsRefunded(uint256 amount, uint256 payers);

    error PaymentEscrowZeroAmount();
    error PaymentEscrowInsufficientBalance(address payer, uint256 available, uint256 amount);
    error PaymentEscrowStillThawing(uint64 thawEnd, uint64 now_);
    error PaymentEscrowNothingThawing();
    error PaymentEscrowZeroSigner();
    error PaymentEscrowSignerAlreadyAuthorized(address payer, address signer);
    error PaymentEscrowSignerNotAuthorized(address payer, address signer);
    error PaymentEscrowNotSettlement(address caller);

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

    /// @notice Deposits `amount` OPEN (pulled with `transferFrom`) to the caller's balance.
    function deposit(uint128 amount) external nonReentrant {
        _deposit(msg.sender, amount);
    }

    /// @notice Deposits `amount` OPEN from the caller to `payer`'s balance.
    function depositFor(address payer, uint128 amount) external nonReentrant {
        _deposit(payer, amount);
    }

    /// @notice Deposits with an EIP-2612 permit instead of a prior `approve`.
    function depositWithPermit(uint128 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s) external nonReentrant {
        IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s);
        _deposit(msg.sender, amount);
    }

    /// @notice Starts thawing `amount` of the caller's balance; the thaw end moves to now + `thawPeriod`.
    /// Thawing funds can still be charged by batches committed before the end.
    function requestWithdrawal(uint128 amount) external {
        Account storage account = _accounts[msg.sender];
        if (amount == 0) revert PaymentEscrowZeroAmount();
        if (amount > account.balance) revert PaymentEscrowInsufficientBalance(msg.sender, account.balance, amount);
        account.balance -= amount;
        account.thawing += amount;
        uint64 thawEnd = uint64(block.timestamp) + thawPeriod;
        _thawEnd[msg.sender] = thawEnd;
        emit WithdrawalRequested(msg.sender, amount, account.thawing, thawEnd);
    }

    /// @notice Sends the caller's thawed funds to `to` once the thaw period has passed.
    function withdraw(address to) external nonReentrant {
        Account storage account = _accounts[msg.sender];
        uint128 amount = account.thawing;
        if (amount == 0) revert PaymentEscrowNothingThawing();
        uint64 thawEnd = _thawEnd[msg.sender];
        if (block.timestamp < thawEnd) revert PaymentEscrowStillThawing(thawEnd, uint64(block.timestamp));
        account.thawing = 0;
        emit Withdrawn(msg.sender, to, amount);
        token.safeTransfer(to, amount);
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

    /// @notice Revokes `signer`; requests it signs are not payable from `noticePeriod` seconds on.
    function revokeSigner(address signer) external {
        SignerAuth storage auth = _signers[msg.sender][signer];
        if (auth.until != type(uint64).max) revert PaymentEscrowSignerNotAuthorized(msg.sender, signer);
        auth.until = uint64(block.timestamp) + noticePeriod;
        emit SignerRevoked(msg.sender, signer, auth.until);
    }

    /// @notice Locks each payer's charge (balance first, then thawing funds). Only settlement.
    /// @return total Sum of the locked amounts.
    function lock(PayerTotal[] calldata charges) external onlySettlement returns (uint256 total) {
        for (uint256 i = 0; i < charges.length; ++i) {
            PayerTotal calldata charge = charges[i];
            Account storage account = _accounts[charge.payer];
            uint128 amount = charge.amount;
            if (amount <= account.balance) {
                account.balance -= amount;
            } else {
                uint256 available = uint256(account.balance) + account.thawing;
                if (amount > available) revert PaymentEscrowInsufficientBalance(charge.payer, available, amount);
                // amount > balance and amount <= balance + thawing, so neither subtraction underflows.
                unchecked {
                    account.thawing -= amount - account.balance;
                }
                account.balance = 0;
            }
            total += amount;
        }
        totalLocked += total;
        emit FundsLocked(total, charges.length);
    }

    /// @notice Releases `amount` of locked funds to the settlement contract (a batch was finalized).
    function settle(uint256 amount) external onlySettlement nonReentrant {
        totalLocked -= amount;
        emit FundsSettled(amount);
        token.safeTransfer(settlement, amount);
    }

    /// @notice Returns locked charges to the payers' balances (a batch was voided). Only settlement.
    function refund(PayerTotal[] calldata charges) external onlySettlement returns (uint256 total) {
        for (uint256 i = 0; i < charges.length; ++i) {
            _accounts[charges[i].payer].balance += charges[i].amount;
            total += charges[i].amount;
        }
        totalLocked -= total;
        emit FundsRefunded(total, charges.length);
    }

    /// @notice A payer's chargeable balance, thawing amount and thaw end.
    function accountOf(address payer) external view returns (uint128 balance, uint128 thawing, uint64 thawEnd) {
        Account storage account = _accounts[payer];
        return (account.balance, account.thawing, _thawEnd[payer]);
    }

    /// @notice When `signer` may sign for `payer`: [since, until). (0, 0) if never authorised.
    function signerOf(address payer, address signer) external view returns (uint64 since, uint64 until) {
        SignerAuth storage auth = _signers[payer][signer];
        return (auth.since, auth.until);
    }

    /// @notice Whether `signer` could sign requests paid by `payer` at `timestamp`. A payer always can.
    function isAuthorized(address payer, address signer, uint64 timestamp) external view returns (bool) {
        if (signer == payer) return true;
        SignerAuth storage auth = _signers[payer][signer];
        return auth.since <= timestamp && timestamp < auth.until;
    }

    function _deposit(address payer, uint128 amount) private {
        if (amount == 0) revert PaymentEscrowZeroAmount();
        _accounts[payer].balance += amount;
        emit Deposited(payer, msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }
}
