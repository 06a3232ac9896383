// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {AdapterRegistry} from "./AdapterRegistry.sol";
import {NodeRegistry} from "./NodeRegistry.sol";
import {PaymentEscrow} from "./PaymentEscrow.sol";
import {
    AdapterTotal,
    BatchTotals,
    InferenceRequest,
    Leaf,
    PayerTotal,
    SumNode,
    UsageRecord,
    UsageTypes,
    Voucher
} from "./UsageTypes.sol";

/// @title UsageSettlement (protocol v2)
/// @notice Batched settlement of signed usage records: payer-signed cumulative caps checked at commit,
/// fraud proofs during a challenge window.
///
/// Every request a payer signs carries `cumulativeCap`, the running total of the caps it has signed for
/// the node, and authorises the charge interval `(cumulativeCap - maxCharge, cumulativeCap]`. At commit the
/// node shows one signed request per payer (the voucher) and the contract enforces
/// `collected[payer][node] <= voucher.cumulativeCap`: whatever the node publishes or withholds, a payer is
/// never charged more than it signed for. Charges are collected at commit from the payer's escrow account
/// for this node; a shortfall (the node served beyond the escrow it should have checked) is covered from the
/// node's own stake, so one short payer never voids the others' records.
///
/// A batch commits its records twice, as two Merkle-sum trees over the same leaves (signed request + usage
/// record): the *payer tree* sorted by (payer, cumulativeCap) whose sums are charges, and the *adapter tree*
/// sorted by (adapterId, termsVersion, payer, cumulativeCap) whose sums are adapter amounts; with them the
/// per-payer charges and per-(adapter, version) revenues, each a contiguous range of one tree. Any cheat in
/// the published data (a bad signature or price, a charge above its cap, a stale or misdirected request,
/// a sum that does not add up, leaves out of order or with overlapping intervals, a record missing from one
/// tree, an interval charged twice) is provable from one or two leaves and their paths. A proof voids the
/// batch, refunds its payers and slashes the node in proportion to the batch's value; the challenger is
/// rewarded only if it committed to its proof in an earlier block ({commitChallenge}), so copying a pending
/// proof earns nothing. After the challenge window anyone finalizes; the adapter revenue waits for
/// {distributeAdapterRevenue}, fees go to claimable balances, and everything is pulled with {claim}.
contract UsageSettlement is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    uint256 private constant _BPS = 10_000;
    uint256 private constant _MAX_DEPTH = 32;

    enum Tree {
        Payer,
        Adapter
    }

    enum Status {
        None,
        Pending,
        Finalized,
        Voided
    }

    enum Fraud {
        None,
        WrongNode,
        RecordMismatch,
        BadSignature,
        OutsideDeadline,
        OverCap,
        WrongPrice,
        SumMismatch,
        Misordered,
        TotalMismatch,
        MissingRecord,
        Overlap
    }

    struct Config {
        IERC20 token;
        PaymentEscrow escrow;
        NodeRegistry nodes;
        AdapterRegistry adapters;
        address treasury;
        uint64 challengeWindow;
        uint64 maxRequestTtl;
        uint64 maxCommitDelay;
        uint16 protocolFeeBps;
        uint16 slashBps;
        uint16 challengerRewardBps;
        uint128 minSlash;
        uint32 maxPayersPerBatch;
        uint32 maxAdapterEntriesPerBatch;
    }

    /// @notice What a node commits besides the totals. `count` and `cid` are informational (events).
    struct Commitment {
        bytes32 payerRoot;
        uint128 payerSum;
        bytes32 adapterRoot;
        uint128 adapterSum;
        uint8 depth;
        uint32 count;
        /// The commit reverts when mined after this time: the node sets it to the earliest
        /// `deadline + maxCommitDelay` among the batch's records, so a commit held in a mempool past that
        /// (where it would be provable fraud) can never land and slash an honest node.
        uint64 commitBy;
        string cid;
    }

    struct Revenue {
        uint128 earned;
        uint128 distributed;
    }

    struct Batch {
        address node;
        uint64 committedAt;
        uint8 depth;
        Status status;
        bytes32 payerRoot;
        bytes32 adapterRoot;
        uint128 payerSum;
        uint128 adapterSum;
        bytes32 totalsHash;
        /// @dev Part of `payerSum` paid from the node's stake because a payer's escrow fell short.
        uint128 covered;
    }

    /// @notice A leaf (or an empty padding leaf) at `index` and its sibling path, bottom up.
    struct LeafProof {
        uint256 index;
        bool empty;
        Leaf leaf;
        SumNode[] siblings;
    }

    /// @notice A position between leaves `position - 1` (`before`) and `position` (`at`); `before` is
    /// ignored at position 0 and `at` at position 2^depth.
    struct Boundary {
        uint256 position;
        LeafProof before;
        LeafProof at;
    }

    IERC20 public immutable token;
    PaymentEscrow public immutable escrow;
    NodeRegistry public immutable nodes;
    AdapterRegistry public immutable adapters;
    address public immutable treasury;
    uint64 public immutable challengeWindow;
    /// @notice A record must be served within [deadline - maxRequestTtl, deadline] of its request.
    uint64 public immutable maxRequestTtl;
    /// @notice A record must be committed at most this long after its request's deadline.
    uint64 public immutable maxCommitDelay;
    uint16 public immutable protocolFeeBps;
    /// @notice A void slashes `slashBps` of the batch's charges (at least `minSlash`, at most the stake).
    uint16 public immutable slashBps;
    uint16 public immutable challengerRewardBps;
    uint128 public immutable minSlash;
    uint32 public immutable maxPayersPerBatch;
    uint32 public immutable maxAdapterEntriesPerBatch;

    uint256 private _batchCount;
    mapping(uint256 batchId => Batch) private _batches;
    mapping(address account => uint256) private _claimable;
    /// @dev Per (adapter, version): revenue earned by finalized batches and the part already distributed.
    /// Both only grow, so after the first batch a finalize updates a non-zero slot (5,000 gas, not 22,100).
    mapping(uint64 adapterId => mapping(uint32 version => Revenue)) private _revenue;
    /// @dev Charges of a node's pending batches; its stake must cover their slash.
    mapping(address node => uint256) private _pendingCharges;
    /// @dev Per batch and payer: the part of the payer's charge its escrow could not pay (usually none).
    mapping(uint256 batchId => mapping(address payer => uint256)) private _deficits;
    /// @dev Challenge commitment keccak256(abi.encode(challenger, keccak256(proof calldata))) -> block number.
    mapping(bytes32 commitment => uint256 blockNumber) private _challengeCommits;

    event BatchCommitted(
        uint256 indexed batchId,
        address indexed node,
        bytes32 payerRoot,
        bytes32 adapterRoot,
        uint128 payerSum,
        uint128 adapterSum,
        uint32 count,
        uint8 depth,
        string cid
    );
    event PayerShort(uint256 indexed batchId, address indexed payer, uint256 charge, uint256 covered);
    event BatchFinalized(uint256 indexed batchId, uint256 adapterRevenue, uint256 nodeFee, uint256 protocolFee);
    event BatchVoided(
        uint256 indexed batchId,
        address indexed challenger,
        address indexed rewarded,
        Fraud reason,
        uint256 slashed,
        uint256 reward
    );
    event ChallengeCommitted(address indexed challenger, bytes32 indexed commitment, uint256 blockNumber);
    event AdapterRevenueDistributed(uint64 indexed adapterId, uint32 indexed version, uint256 amount);
    event Claimed(address indexed account, address indexed to, uint256 amount);

    error UsageSettlementBadConfig(string reason);
    error UsageSettlementNotNodeOrSigner(address node, address caller);
    error UsageSettlementNodeInactive(address node);
    error UsageSettlementCommitTooLate(uint64 commitBy);
    error UsageSettlementBadShape(uint32 count, uint8 depth);
    error UsageSettlementBadPayerCount(uint256 payers, uint256 vouchers, uint256 max);
    error UsageSettlementTooManyAdapterEntries(uint256 entries, uint256 max);
    error UsageSettlementPayersNotSorted(uint256 index);
    error UsageSettlementAdaptersNotSorted(uint256 index);
    error UsageSettlementZeroAmount(Tree tree, uint256 index);
    error UsageSettlementBaseModelEntry(uint256 index);
    error UsageSettlementSumMismatch(Tree tree, uint256 totals, uint256 rootSum);
    error UsageSettlementAdapterSumTooHigh(uint256 adapterSum, uint256 payerSum);
    error UsageSettlementVoucherMismatch(uint256 index, address payer, address node);
    error UsageSettlementBadVoucherSignature(address payer, address signer);
        error UsageSettlementStakeTooLow(address node, uint256 stake, uint256 pendingCharges);
    error UsageSettlementUnknownBatch(uint256 batchId);
    error UsageSettlementNotPending(uint256 batchId, Status status);
    error UsageSettlementTotalsMismatch(uint256 batchId, bytes32 expected, bytes32 given);
    error UsageSettlementChallengeWindowOpen(uint256 batchId, uint256 endsAt);
    error UsageSettlementChallengeWindowClosed(uint256 batchId, uint256 endedAt);
    error UsageSettlementChallengeAlreadyCommitted(bytes32 commitment);
    error UsageSettlementNothingToClaim(address account);
    error UsageSettlementNothingToDistribute(uint64 adapterId, uint32 version);
    error UsageSettlementBadProofLength(uint256 expected, uint256 given);
    error UsageSettlementIndexOutOfRange(uint256 index, uint256 level);
    error UsageSettlementInvalidProof(Tree tree, bytes32 root, uint256 sum);
    error UsageSettlementEmptyLeaf(uint256 index);
    error UsageSettlementRecordValid(uint256 index);
    error UsageSettlementSumCorrect(uint256 sum);
    error UsageSettlementBadLevel(uint256 level);
    error UsageSettlementInvalidPreimage(bytes32 hash);
    error UsageSettlementNotAdjacent(uint256 first, uint256 second);
    error UsageSettlementOrderCorrect(uint256 first, uint256 second);
    error UsageSettlementEntryOutOfRange(uint256 entry, uint256 length);
    error UsageSettlementBadBoundary(uint256 position);
    error UsageSettlementTotalCorrect(uint256 total);
    error UsageSettlementRecordPresent(uint256 index);
    error UsageSettlementNotComparable(uint256 batchId);
    error UsageSettlementDifferentNodes(address node, address otherNode);
    error UsageSettlementSameLeaf(uint256 batchId, uint256 index);
    error UsageSettlementNoOverlap(address payer, address otherPayer);

    /// @param config Contract addresses and economic parameters. The escrow and the node registry must name
    /// this contract as their settlement and share its token. Periods: a signer revocation and a withdrawal
    /// must outlast `maxRequestTtl + maxCommitDelay` (so what a node checked when serving is still there
    /// when it must commit), unbonding must outlast the challenge window (so a pending batch stays slashable).
    constructor(Config memory config) EIP712("OpenLoRA", "2") {
        if (config.treasury == address(0)) revert UsageSettlementBadConfig("treasury is the zero address");
        if (config.protocolFeeBps > _BPS || config.challengerRewardBps > _BPS) {
            revert UsageSettlementBadConfig("basis points above 10000");
        }
        if (config.slashBps == 0 || config.slashBps > _BPS) revert UsageSettlementBadConfig("slashBps not in 1..10000");
        if (config.challengeWindow == 0) revert UsageSettlementBadConfig("challengeWindow is 0");
        if (config.maxCommitDelay == 0) revert UsageSettlementBadConfig("maxCommitDelay is 0");
        if (config.maxPayersPerBatch == 0 || config.maxAdapterEntriesPerBatch == 0) {
            revert UsageSettlementBadConfig("batch entry caps are 0");
        }
        if (config.escrow.settlement() != address(this) || config.nodes.settlement() != address(this)) {
            revert UsageSettlementBadConfig("escrow or node registry names another settlement");
        }
        if (config.escrow.token() != config.token || config.nodes.token() != config.token) {
            revert UsageSettlementBadConfig("escrow or node registry holds another token");
        }
        uint256 servePeriod = uint256(config.maxRequestTtl) + config.maxCommitDelay;
        if (config.escrow.noticePeriod() == 0 || config.escrow.noticePeriod() <= servePeriod) {
            revert UsageSettlementBadConfig("noticePeriod must exceed maxRequestTtl + maxCommitDelay");
        }
        if (config.escrow.thawPeriod() <= servePeriod) {
            revert UsageSettlementBadConfig("thawPeriod must exceed maxRequestTtl + maxCommitDelay");
        }
        if (config.nodes.unbondingDelay() <= config.challengeWindow) {
            revert UsageSettlementBadConfig("unbondingDelay must exceed challengeWindow");
        }
        token = config.token;
        escrow = config.escrow;
        nodes = config.nodes;
        adapters = config.adapters;
        treasury = config.treasury;
        challengeWindow = config.challengeWindow;
        maxRequestTtl = config.maxRequestTtl;
        maxCommitDelay = config.maxCommitDelay;
        protocolFeeBps = config.protocolFeeBps;
        slashBps = config.slashBps;
        challengerRewardBps = config.challengerRewardBps;
        minSlash = config.minSlash;
        maxPayersPerBatch = config.maxPayersPerBatch;
        maxAdapterEntriesPerBatch = config.maxAdapterEntriesPerBatch;
    }

    // ------------------------------------------------------------------ commit and finalize

    /// @notice Commits a batch of `node`'s usage records and collects each payer's charge from its escrow
    /// account for `node`. Callable by the node or its signer key while the node is active.
    /// Per payer, `vouchers[i]` is a request signed by `totals.payers[i].payer` (or a signer valid now) for
    /// `node`, and what the node has collected from that payer, this charge included, must not exceed its
    /// `cumulativeCap`. A payer's shortfall is covered from the node's stake. The node's stake must cover
    /// the slash of all its pending charges.
    /// @param c Roots and sums of the two trees, tree depth, record count, the time after which the commit
    /// must not land (`commitBy`) and the batch file's CID.
    /// @param totals Per-payer charges (sorted by payer) and per-(adapter, version) revenues (sorted), all > 0.
    /// @param vouchers One signed request per payer, in the order of `totals.payers`.
    /// @return batchId The new batch's id (ids start at 1).
    function commitBatch(address node, Commitment calldata c, BatchTotals calldata totals, Voucher[] calldata vouchers)
        external
        nonReentrant
        returns (uint256 batchId)
    {
        (bool active, address signer, uint128 stake) = nodes.commitInfo(node);
        if (msg.sender != node && msg.sender != signer) revert UsageSettlementNotNodeOrSigner(node, msg.sender);
        if (!active) revert UsageSettlementNodeInactive(node);
        if (block.timestamp > c.commitBy) revert UsageSettlementCommitTooLate(c.commitBy);
        _checkShape(c, totals, vouchers.length);
        PayerTotal[] calldata payers = totals.payers;
        for (uint256 i = 0; i < payers.length; ++i) {
            _checkVoucher(node, i, payers[i].payer, vouchers[i]);
        }
        uint256 pending = _pendingCharges[node] + c.payerSum;
        _pendingCharges[node] = pending;
        Batch storage b;
        (batchId, b) = _store(node, c, totals);

        // Interactions with our own escrow and registry (no token callbacks reach an outsider here).
        uint256 covered = _collect(batchId, node, payers, vouchers);
        if (covered > 0) {
            if (covered > stake) revert UsageSettlementStakeTooLow(node, stake, covered);
            // covered <= stake < 2^128.
            b.covered = uint128(covered);
            stake -= uint128(covered);
            nodes.cover(node, uint128(covered));
        }
        if (pending * slashBps > uint256(stake) * _BPS) revert UsageSettlementStakeTooLow(node, stake, pending);
    }

    /// @notice Finalizes a batch whose challenge window has passed: credits each (adapter, version) with
    /// its revenue, the node with its fee and the treasury with the protocol's share, and moves the
    /// batch's collected funds here. Callable by anyone.
    function finalizeBatch(uint256 batchId, BatchTotals calldata totals) external nonReentrant {
        Batch storage b = _pending(batchId, totals);
        uint256 endsAt = uint256(b.committedAt) + challengeWindow;
        if (block.timestamp < endsAt) revert UsageSettlementChallengeWindowOpen(batchId, endsAt);
        b.status = Status.Finalized;
        uint256 payerSum = b.payerSum;
        _pendingCharges[b.node] -= payerSum;

        uint256 adapterRevenue = 0;
        AdapterTotal[] calldata entries = totals.adapters;
        for (uint256 i = 0; i < entries.length; ++i) {
            uint256 net = entries[i].amount - (uint256(entries[i].amount) * protocolFeeBps) / _BPS;
            // net <= amount < 2^128; earned would need 2^128 wei of OPEN to overflow (checked anyway).
            _revenue[entries[i].adapterId][entries[i].termsVersion].earned += uint128(net);
            adapterRevenue += net;
        }
        uint256 nodeGross = payerSum - b.adapterSum;
        uint256 nodeFee = nodeGross - (nodeGross * protocolFeeBps) / _BPS;
        uint256 protocolFee = payerSum - adapterRevenue - nodeFee;
        _claimable[b.node] += nodeFee;
        _claimable[treasury] += protocolFee;
        emit BatchFinalized(batchId, adapterRevenue, nodeFee, protocolFee);
        escrow.settle(payerSum - b.covered);
    }

    /// @notice Moves the finalized, undistributed revenue of an (adapter, version) to its contributors'
    /// claimable balances by the version's basis-point split; the rounding remainder goes to the first
    /// contributor. Callable by anyone.
    function distributeAdapterRevenue(uint64 adapterId, uint32 version) external {
        Revenue storage revenue = _revenue[adapterId][version];
        uint256 amount = revenue.earned - revenue.distributed;
        if (amount == 0) revert UsageSettlementNothingToDistribute(adapterId, version);
        (address[] memory contributors, uint16[] memory sharesBps) = adapters.split(adapterId, version);
        revenue.distributed = revenue.earned;
        uint256 rest = amount;
        for (uint256 i = 1; i < contributors.length; ++i) {
            uint256 part = (amount * sharesBps[i]) / _BPS;
            _claimable[contributors[i]] += part;
            rest -= part;
        }
        _claimable[contributors[0]] += rest;
        emit AdapterRevenueDistributed(adapterId, version, amount);
    }

    /// @notice Sends the caller's whole claimable balance (fees, revenue shares, rewards) to `to`.
    function claim(address to) external nonReentrant returns (uint256 amount) {
        amount = _claimable[msg.sender];
        if (amount == 0) revert UsageSettlementNothingToClaim(msg.sender);
        _claimable[msg.sender] = 0;
        emit Claimed(msg.sender, to, amount);
        token.safeTransfer(to, amount);
    }

    // ------------------------------------------------------------------ fraud proofs

    /// @notice Commits to a fraud proof before sending it: `commitment` is
    /// `keccak256(abi.encode(challenger, keccak256(proofCalldata)))`. A proof sent by `challenger` in a later
    /// block earns the challenger reward; a proof without an earlier commitment still voids the batch, but
    /// its reward goes to the treasury, so copying someone's pending proof earns nothing.
    function commitChallenge(bytes32 commitment) external {
        if (_challengeCommits[commitment] != 0) revert UsageSettlementChallengeAlreadyCommitted(commitment);
        _challengeCommits[commitment] = block.number;
        emit ChallengeCommitted(msg.sender, commitment, block.number);
    }

    /// @notice Proves a leaf breaks a record rule (see {checkLeaf}), judged at the batch's commit time:
    /// wrong node, record not matching its request, payer signature invalid or by a key not valid at
    /// commit, served or committed outside its deadline window, above its caps or with a malformed
    /// interval, or not priced by the terms in force when served.
    function proveInvalidRecord(uint256 batchId, BatchTotals calldata totals, Tree tree, LeafProof calldata proof)
        external
        nonReentrant
    {
        Batch storage b = _challengeable(batchId, totals);
        if (proof.empty) revert UsageSettlementEmptyLeaf(proof.index);
        _verifyLeaf(b, tree, proof);
        Fraud reason = _recordFraud(b.node, b.committedAt, proof.leaf);
        if (reason == Fraud.None) revert UsageSettlementRecordValid(proof.index);
        _void(batchId, b, totals, reason);
    }

    /// @notice Proves a leaf node whose sum is not its record's amount (or an empty leaf with a sum).
    /// @param claimedSum The sum the tree carries for the leaf.
    function proveLeafSumMismatch(
        uint256 batchId,
        BatchTotals calldata totals,
        Tree tree,
        LeafProof calldata proof,
        uint256 claimedSum
    ) external nonReentrant {
        Batch storage b = _challengeable(batchId, totals);
        bytes32 hash = proof.empty ? bytes32(0) : UsageTypes.leafHash(proof.leaf);
        uint256 actual = proof.empty ? 0 : _leafSum(tree, proof.leaf);
        if (claimedSum == actual) revert UsageSettlementSumCorrect(actual);
        _verifyNode(b, tree, 0, proof.index, SumNode(hash, claimedSum), proof.siblings);
        _void(batchId, b, totals, Fraud.SumMismatch);
    }

    /// @notice Proves an internal node whose sum is not the sum of its children's.
    /// @param level Height of the node (1 = parent of leaves, depth = root).
    function proveNodeSumMismatch(
        uint256 batchId,
        BatchTotals calldata totals,
        Tree tree,
        uint256 level,
        uint256 index,
        SumNode calldata node,
        SumNode[] calldata siblings,
        SumNode calldata left,
        SumNode calldata right
    ) external nonReentrant {
        Batch storage b = _challengeable(batchId, totals);
        if (level == 0 || level > b.depth) revert UsageSettlementBadLevel(level);
        _verifyNode(b, tree, level, index, node, siblings);
        if (_hashPair(left.hash, left.sum, right.hash, right.sum) != node.hash) {
            revert UsageSettlementInvalidPreimage(node.hash);
        }
        if (left.sum <= node.sum && right.sum == node.sum - left.sum) revert UsageSettlementSumCorrect(node.sum);
        _void(batchId, b, totals, Fraud.SumMismatch);
    }

    /// @notice Proves two adjacent leaves out of strict key order, a record after an empty leaf, or (payer
    /// tree) two adjacent records of one payer whose charge intervals overlap. Since the payer tree is
    /// sorted by interval end, any overlap inside a batch shows up between two neighbours.
    function proveMisorder(
        uint256 batchId,
        BatchTotals calldata totals,
        Tree tree,
        LeafProof calldata first,
        LeafProof calldata second
    ) external nonReentrant {
        Batch storage b = _challengeable(batchId, totals);
        if (second.index != first.index + 1) revert UsageSettlementNotAdjacent(first.index, second.index);
        _verifyLeaf(b, tree, first);
        _verifyLeaf(b, tree, second);
        bool misordered;
        if (second.empty) {
            misordered = false;
        } else if (first.empty) {
            misordered = true;
        } else {
            misordered = !_less(tree, first.leaf, second.leaf)
                || (tree == Tree.Payer && first.leaf.request.payer == second.leaf.request.payer
                    && UsageTypes.overlaps(first.leaf.request, second.leaf.request));
        }
        if (!misordered) revert UsageSettlementOrderCorrect(first.index, second.index);
        _void(batchId, b, totals, Fraud.Misordered);
    }

    /// @notice Proves a committed total is not the sum of its range of the tree: the payer entry's range
    /// in the payer tree, or the (adapter, version) entry's range in the adapter tree. `lower` and `upper`
    /// are the first positions whose group is >= the entry's group and > it.
    function proveTotalMismatch(
        uint256 batchId,
        BatchTotals calldata totals,
        Tree tree,
        uint256 entry,
        Boundary calldata lower,
        Boundary calldata upper
    ) external nonReentrant {
        Batch storage b = _challengeable(batchId, totals);
        (uint256 group, uint256 claimed) = _entry(totals, tree, entry);
        uint256 start = _boundary(b, tree, lower, group);
        uint256 end = _boundary(b, tree, upper, group + 1);
        if (upper.position < lower.position || end < start) revert UsageSettlementBadBoundary(upper.position);
        if (end - start == claimed) revert UsageSettlementTotalCorrect(claimed);
        _void(batchId, b, totals, Fraud.TotalMismatch);
    }

    /// @notice Proves a record of tree `from` is missing from the other tree: `slot` is where its key
    /// would be there, and holds neither it nor its key (or holds its key with other contents).
    function proveMissingRecord(
        uint256 batchId,
        BatchTotals calldata totals,
        Tree from,
        LeafProof calldata present,
        Boundary calldata slot
    ) external nonReentrant {
        Batch storage b = _challengeable(batchId, totals);
        if (present.empty) revert UsageSettlementEmptyLeaf(present.index);
        _verifyLeaf(b, from, present);
        Tree to = from == Tree.Payer ? Tree.Adapter : Tree.Payer;
        uint256 width = uint256(1) << b.depth;
        if (slot.position > width) revert UsageSettlementBadBoundary(slot.position);
        if (slot.position > 0) {
            _checkBoundaryLeaf(b, to, slot.before, slot.position - 1);
            if (!_less(to, slot.before.leaf, present.leaf)) revert UsageSettlementBadBoundary(slot.position);
        }
        if (slot.position < width) {
            if (slot.at.index != slot.position) revert UsageSettlementBadBoundary(slot.position);
            _verifyLeaf(b, to, slot.at);
            if (!slot.at.empty) {
                if (_less(to, slot.at.leaf, present.leaf)) revert UsageSettlementBadBoundary(slot.position);
                if (UsageTypes.leafHash(slot.at.leaf) == UsageTypes.leafHash(present.leaf)) {
                    revert UsageSettlementRecordPresent(slot.position);
                }
            }
        }
        _void(batchId, b, totals, Fraud.MissingRecord);
    }

    /// @notice Proves one payer's charge interval used twice by one node: a payer-tree leaf of this batch
    /// and one of another (pending or finalized) batch of the same node (or another leaf of this one) whose
    /// intervals `(cumulativeCap - maxCharge, cumulativeCap]` overlap. An honest node refuses a request whose
    /// interval overlaps one it has served, so only a node that served both can be caught by this.
    function proveDuplicate(
        uint256 batchId,
        BatchTotals calldata totals,
        LeafProof calldata proof,
        uint256 otherBatchId,
        LeafProof calldata other
    ) external nonReentrant {
        Batch storage b = _challengeable(batchId, totals);
        Batch storage ob = _batches[otherBatchId];
        if (ob.status != Status.Pending && ob.status != Status.Finalized) revert UsageSettlementNotComparable(otherBatchId);
        if (ob.node != b.node) revert UsageSettlementDifferentNodes(b.node, ob.node);
        if (otherBatchId == batchId && other.index == proof.index) revert UsageSettlementSameLeaf(batchId, proof.index);
        if (proof.empty) revert UsageSettlementEmptyLeaf(proof.index);
        if (other.empty) revert UsageSettlementEmptyLeaf(other.index);
        _verifyLeaf(b, Tree.Payer, proof);
        _verifyLeaf(ob, Tree.Payer, other);
        InferenceRequest calldata r1 = proof.leaf.request;
        InferenceRequest calldata r2 = other.leaf.request;
        if (r1.payer != r2.payer || !UsageTypes.overlaps(r1, r2)) revert UsageSettlementNoOverlap(r1.payer, r2.payer);
        _void(batchId, b, totals, Fraud.Overlap);
    }

    // ------------------------------------------------------------------ views

    /// @notice Number of batches committed so far (the highest id).
    function batchCount() external view returns (uint256) {
        return _batchCount;
    }

    /// @notice The stored header of a batch.
    function batchOf(uint256 batchId) external view returns (Batch memory) {
        return _batches[batchId];
    }

    /// @notice Claimable balance of an account.
    function claimableOf(address account) external view returns (uint256) {
        return _claimable[account];
    }

    /// @notice Finalized revenue of an (adapter, version) not yet distributed to its contributors.
    function undistributedOf(uint64 adapterId, uint32 version) external view returns (uint256) {
        Revenue storage revenue = _revenue[adapterId][version];
        return revenue.earned - revenue.distributed;
    }

    /// @notice Charges of `node`'s pending batches.
    function pendingChargesOf(address node) external view returns (uint256) {
        return _pendingCharges[node];
    }

    /// @notice The part of `payer`'s charge in a batch that the node's stake covered.
    function deficitOf(uint256 batchId, address payer) external view returns (uint256) {
        return _deficits[batchId][payer];
    }

    /// @notice Block in which a challenge commitment was made (0 if none).
    function challengeCommittedAt(bytes32 commitment) external view returns (uint256) {
        return _challengeCommits[commitment];
    }

    /// @notice EIP-712 struct hash of a request.
    function hashRequest(InferenceRequest calldata request) external pure returns (bytes32) {
        return UsageTypes.hash(request);
    }

    /// @notice EIP-712 struct hash of a usage record.
    function hashUsageRecord(UsageRecord calldata record) external pure returns (bytes32) {
        return UsageTypes.hash(record);
    }

    /// @notice EIP-712 digest (what the payer signs) of a request under this contract's domain.
    function requestDigest(InferenceRequest calldata request) external view returns (bytes32) {
        return _hashTypedDataV4(UsageTypes.hash(request));
    }

    /// @notice EIP-712 digest (what the node signs) of a usage record under this contract's domain.
    function usageRecordDigest(UsageRecord calldata record) external view returns (bytes32) {
        return _hashTypedDataV4(UsageTypes.hash(record));
    }

    /// @notice Recovers the signer of a request; reverts on malformed or high-s signatures.
    function recoverRequestSigner(InferenceRequest calldata request, uint8 v, bytes32 r, bytes32 s)
        external
        view
        returns (address)
    {
        return ECDSA.recover(_hashTypedDataV4(UsageTypes.hash(request)), v, r, s);
    }

    /// @notice Double-hashed leaf of a batch tree.
    function leafHash(Leaf calldata leaf) external pure returns (bytes32) {
        return UsageTypes.leafHash(leaf);
    }

    /// @notice The first record rule `leaf` breaks if `node` committed it at `committedAt` (None if none).
    function checkLeaf(address node, uint64 committedAt, Leaf calldata leaf) external view returns (Fraud) {
        return _recordFraud(node, committedAt, leaf);
    }

    // ------------------------------------------------------------------ internals

    /// @dev Commit-time checks of the batch's shape and totals: a bounded number of entries (so finalize
    /// and void always fit in a block), strictly sorted, every amount > 0, sums equal to the roots' sums.
    function _checkShape(Commitment calldata c, BatchTotals calldata totals, uint256 voucherCount) private view {
        if (c.count == 0 || c.depth > _MAX_DEPTH || c.count > (uint256(1) << c.depth)) {
            revert UsageSettlementBadShape(c.count, c.depth);
        }
        PayerTotal[] calldata payers = totals.payers;
        if (payers.length == 0 || payers.length > maxPayersPerBatch || voucherCount != payers.length) {
            revert UsageSettlementBadPayerCount(payers.length, voucherCount, maxPayersPerBatch);
        }
        AdapterTotal[] calldata entries = totals.adapters;
        if (entries.length > maxAdapterEntriesPerBatch) {
            revert UsageSettlementTooManyAdapterEntries(entries.length, maxAdapterEntriesPerBatch);
        }
        uint256 payerSum = 0;
        address previousPayer = address(0);
        for (uint256 i = 0; i < payers.length; ++i) {
            if (payers[i].payer <= previousPayer) revert UsageSettlementPayersNotSorted(i);
            if (payers[i].amount == 0) revert UsageSettlementZeroAmount(Tree.Payer, i);
            previousPayer = payers[i].payer;
            payerSum += payers[i].amount;
        }
        if (payerSum != c.payerSum) revert UsageSettlementSumMismatch(Tree.Payer, payerSum, c.payerSum);
        uint256 adapterSum = 0;
        uint256 previousKey = 0;
        for (uint256 i = 0; i < entries.length; ++i) {
            if (entries[i].adapterId == 0) revert UsageSettlementBaseModelEntry(i);
            uint256 key = (uint256(entries[i].adapterId) << 32) | entries[i].termsVersion;
            if (key <= previousKey) revert UsageSettlementAdaptersNotSorted(i);
            if (entries[i].amount == 0) revert UsageSettlementZeroAmount(Tree.Adapter, i);
            previousKey = key;
            adapterSum += entries[i].amount;
        }
        if (adapterSum != c.adapterSum) revert UsageSettlementSumMismatch(Tree.Adapter, adapterSum, c.adapterSum);
        if (adapterSum > payerSum) revert UsageSettlementAdapterSumTooHigh(adapterSum, payerSum);
    }

    /// @dev Stores a new pending batch's header and announces it.
    function _store(address node, Commitment calldata c, BatchTotals calldata totals)
        private
        returns (uint256 batchId, Batch storage b)
    {
        batchId = ++_batchCount;
        b = _batches[batchId];
        b.node = node;
        b.committedAt = uint64(block.timestamp);
        b.depth = c.depth;
        b.status = Status.Pending;
        b.payerRoot = c.payerRoot;
        b.adapterRoot = c.adapterRoot;
        b.payerSum = c.payerSum;
        b.adapterSum = c.adapterSum;
        b.totalsHash = keccak256(abi.encode(totals));
        emit BatchCommitted(batchId, node, c.payerRoot, c.adapterRoot, c.payerSum, c.adapterSum, c.count, c.depth, c.cid);
    }

    /// @dev Collects each payer's charge from its escrow account for `node` within its voucher's cumulative
    /// cap; records and returns the shortfall the node's stake must cover.
    function _collect(uint256 batchId, address node, PayerTotal[] calldata payers, Voucher[] calldata vouchers)
        private
        returns (uint256 covered)
    {
        for (uint256 i = 0; i < payers.length; ++i) {
            (address payer, uint128 amount) = (payers[i].payer, payers[i].amount);
            uint128 taken = escrow.collect(payer, node, amount, vouchers[i].request.cumulativeCap);
            if (taken < amount) {
                // taken < amount: no underflow; the sum is at most payerSum < 2^128.
                unchecked {
                    _deficits[batchId][payer] = amount - taken;
                    covered += amount - taken;
                }
                emit PayerShort(batchId, payer, amount, amount - taken);
            }
        }
    }

    /// @dev Checks that `voucher` is a request `payer` (or a signer valid now) signed for `node`; the escrow
    /// then holds what the node collected from the payer to its `cumulativeCap`.
    function _checkVoucher(address node, uint256 index, address payer, Voucher calldata voucher) private view {
        InferenceRequest calldata request = voucher.request;
        if (request.payer != payer || request.node != node) {
            revert UsageSettlementVoucherMismatch(index, request.payer, request.node);
        }
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecover(_hashTypedDataV4(UsageTypes.hash(request)), voucher.v, voucher.r, voucher.s);
        if (err != ECDSA.RecoverError.NoError || !_signerValid(payer, signer, uint64(block.timestamp))) {
            revert UsageSettlementBadVoucherSignature(payer, signer);
        }
    }

    function _signerValid(address payer, address signer, uint64 t) private view returns (bool) {
        return signer == payer || escrow.signerValidAt(payer, signer, t);
    }

    function _pending(uint256 batchId, BatchTotals calldata totals) private view returns (Batch storage b) {
        b = _batches[batchId];
        if (b.status == Status.None) revert UsageSettlementUnknownBatch(batchId);
        if (b.status != Status.Pending) revert UsageSettlementNotPending(batchId, b.status);
        bytes32 given = keccak256(abi.encode(totals));
        if (given != b.totalsHash) revert UsageSettlementTotalsMismatch(batchId, b.totalsHash, given);
    }

    function _challengeable(uint256 batchId, BatchTotals calldata totals) private view returns (Batch storage b) {
        b = _pending(batchId, totals);
        uint256 endsAt = uint256(b.committedAt) + challengeWindow;
        if (block.timestamp >= endsAt) revert UsageSettlementChallengeWindowClosed(batchId, endsAt);
    }

    /// @dev Who gets the challenger reward of the proof in this call: its sender if it committed to this
    /// exact calldata in an earlier block ({commitChallenge}), otherwise the treasury.
    function _rewarded() private returns (address) {
        bytes32 commitment = keccak256(abi.encode(msg.sender, keccak256(msg.data)));
        uint256 at = _challengeCommits[commitment];
        if (at == 0 || at >= block.number) return treasury;
        delete _challengeCommits[commitment];
        return msg.sender;
    }

    /// @dev Voids a pending batch: give the cap capacity back, refund what each payer's escrow paid, return
    /// what the node's stake covered, slash the node in proportion to the batch's charges, reward the
    /// challenger (or the treasury).
    function _void(uint256 batchId, Batch storage b, BatchTotals calldata totals, Fraud reason) private {
        b.status = Status.Voided;
        address node = b.node;
        uint128 covered = b.covered;
        _pendingCharges[node] -= b.payerSum;
        uint256 slash = _slashFor(node, b.payerSum, covered);
        uint256 reward = (slash * challengerRewardBps) / _BPS;
        address rewarded = _rewarded();
        _claimable[rewarded] += reward;
        _claimable[treasury] += slash - reward;
        emit BatchVoided(batchId, msg.sender, rewarded, reason, slash, reward);

        PayerTotal[] calldata payers = totals.payers;
        for (uint256 i = 0; i < payers.length; ++i) {
            uint128 amount = payers[i].amount;
            // A deficit is at most the payer's charge (and there is none when nothing was covered).
            uint128 taken = covered > 0 ? amount - uint128(_deficits[batchId][payers[i].payer]) : amount;
            escrow.refund(payers[i].payer, node, amount, taken);
        }
        if (covered > 0) {
            token.safeTransfer(address(nodes), covered);
            nodes.returnCover(node, covered);
        }
        nodes.slash(node, slash);
    }

    /// @dev `slashBps` of the batch's charges, at least `minSlash`, at most what the node has at stake
    /// (its stake, its unbonding stake and the cover the void returns to it).
    function _slashFor(address node, uint256 payerSum, uint256 covered) private view returns (uint256 slash) {
        slash = (payerSum * slashBps) / _BPS;
        if (slash < minSlash) slash = minSlash;
        uint256 slashable = nodes.slashableOf(node) + covered;
        if (slash > slashable) slash = slashable;
    }

    function _recordFraud(address node, uint64 committedAt, Leaf calldata leaf) private view returns (Fraud) {
        InferenceRequest calldata request = leaf.request;
        UsageRecord calldata record = leaf.record;
        if (request.node != node) return Fraud.WrongNode;
        bytes32 digest = _hashTypedDataV4(UsageTypes.hash(request));
        if (record.requestDigest != digest) return Fraud.RecordMismatch;
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, leaf.v, leaf.r, leaf.s);
        if (err != ECDSA.RecoverError.NoError || !_signerValid(request.payer, signer, committedAt)) {
            return Fraud.BadSignature;
        }
        if (
            record.servedAt > request.deadline || uint256(record.servedAt) + maxRequestTtl < request.deadline
                || record.servedAt > committedAt || committedAt > uint256(request.deadline) + maxCommitDelay
        ) return Fraud.OutsideDeadline;
        if (
            record.outputTokens > request.maxTokens || record.charge > request.maxCharge || request.maxCharge == 0
                || request.cumulativeCap < request.maxCharge
        ) return Fraud.OverCap;
        if (!_pricedRight(node, request, record)) return Fraud.WrongPrice;
        return Fraud.None;
    }

    /// @dev Adapter amount and charge recomputed from the terms and the node fee in force at `servedAt`,
    /// with the payer-signed input token count. Adapter id 0 is the base model: no adapter revenue.
    function _pricedRight(address node, InferenceRequest calldata request, UsageRecord calldata record)
        private
        view
        returns (bool)
    {
        uint256 adapterAmount = 0;
        if (request.adapterId == 0) {
            if (record.termsVersion != 0) return false;
        } else {
            (bool found, uint32 version, bool retired, uint96 priceIn, uint96 priceOut) =
                adapters.versionAt(request.adapterId, record.servedAt);
            if (!found || retired || version != record.termsVersion) return false;
            adapterAmount = uint256(priceIn) * request.inputTokens + uint256(priceOut) * record.outputTokens;
        }
        if (record.adapterAmount != adapterAmount) return false;
        (bool feeFound, uint96 feePerToken) = nodes.feeAt(node, record.servedAt);
        uint256 tokens = uint256(request.inputTokens) + record.outputTokens;
        return feeFound && record.charge == adapterAmount + uint256(feePerToken) * tokens;
    }

    function _entry(BatchTotals calldata totals, Tree tree, uint256 entry)
        private
        pure
        returns (uint256 group, uint256 amount)
    {
        if (tree == Tree.Payer) {
            if (entry >= totals.payers.length) revert UsageSettlementEntryOutOfRange(entry, totals.payers.length);
            return (uint160(totals.payers[entry].payer), totals.payers[entry].amount);
        }
        if (entry >= totals.adapters.length) revert UsageSettlementEntryOutOfRange(entry, totals.adapters.length);
        AdapterTotal calldata a = totals.adapters[entry];
        return ((uint256(a.adapterId) << 32) | a.termsVersion, a.amount);
    }

    /// @dev Checks that `boundary` is the first position whose leaf group is >= `threshold` (leaves
    /// before it are all below, by the sorted order) and returns the sum of the leaves before it.
    function _boundary(Batch storage b, Tree tree, Boundary calldata boundary, uint256 threshold)
        private
        view
        returns (uint256 prefixSum)
    {
        uint256 width = uint256(1) << b.depth;
        uint256 position = boundary.position;
        if (position > width) revert UsageSettlementBadBoundary(position);
        if (position > 0) {
            _checkBoundaryLeaf(b, tree, boundary.before, position - 1);
            if (_group(tree, boundary.before.leaf) >= threshold) revert UsageSettlementBadBoundary(position);
        }
        if (position == width) return tree == Tree.Payer ? b.payerSum : b.adapterSum;
        if (boundary.at.index != position) revert UsageSettlementBadBoundary(position);
        prefixSum = _verifyLeaf(b, tree, boundary.at);
        if (!boundary.at.empty && _group(tree, boundary.at.leaf) < threshold) {
            revert UsageSettlementBadBoundary(position);
        }
    }

    function _checkBoundaryLeaf(Batch storage b, Tree tree, LeafProof calldata proof, uint256 index) private view {
        if (proof.index != index) revert UsageSettlementBadBoundary(index + 1);
        if (proof.empty) revert UsageSettlementEmptyLeaf(index);
        _verifyLeaf(b, tree, proof);
    }

    /// @dev Verifies a leaf proof against the batch's tree; returns the sum of all leaves left of it.
    function _verifyLeaf(Batch storage b, Tree tree, LeafProof calldata proof) private view returns (uint256) {
        SumNode memory node = proof.empty
            ? SumNode(bytes32(0), 0)
            : SumNode(UsageTypes.leafHash(proof.leaf), _leafSum(tree, proof.leaf));
        return _verifyNode(b, tree, 0, proof.index, node, proof.siblings);
    }

    /// @dev Climbs from `node` at (`level`, `index`) to the root and compares it with the committed root
    /// hash and sum; returns the sum of all leaves left of the node.
    function _verifyNode(
        Batch storage b,
        Tree tree,
        uint256 level,
        uint256 index,
        SumNode memory node,
        SumNode[] calldata siblings
    ) private view returns (uint256 leftSum) {
        uint256 height = b.depth - level;
        if (siblings.length != height) revert UsageSettlementBadProofLength(height, siblings.length);
        if (index >> height != 0) revert UsageSettlementIndexOutOfRange(index, level);
        bytes32 hash = node.hash;
        uint256 sum = node.sum;
        for (uint256 i = 0; i < height; ++i) {
            SumNode calldata sibling = siblings[i];
            if ((index >> i) & 1 == 0) {
                hash = _hashPair(hash, sum, sibling.hash, sibling.sum);
            } else {
                hash = _hashPair(sibling.hash, sibling.sum, hash, sum);
                leftSum += sibling.sum;
            }
            sum += sibling.sum;
        }
        (bytes32 root, uint256 rootSum) =
            tree == Tree.Payer ? (b.payerRoot, uint256(b.payerSum)) : (b.adapterRoot, uint256(b.adapterSum));
        if (hash != root || sum != rootSum) revert UsageSettlementInvalidProof(tree, hash, sum);
    }

    function _hashPair(bytes32 leftHash, uint256 leftSum, bytes32 rightHash, uint256 rightSum)
        private
        pure
        returns (bytes32 result)
    {
        // keccak256(abi.encode(leftHash, leftSum, rightHash, rightSum)) in scratch memory, no allocation.
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, leftHash)
            mstore(add(ptr, 0x20), leftSum)
            mstore(add(ptr, 0x40), rightHash)
            mstore(add(ptr, 0x60), rightSum)
            result := keccak256(ptr, 0x80)
        }
    }

    function _leafSum(Tree tree, Leaf calldata leaf) private pure returns (uint256) {
        return tree == Tree.Payer ? leaf.record.charge : leaf.record.adapterAmount;
    }

    /// @dev The range a leaf belongs to in `tree`: its payer, or `adapterId << 32 | termsVersion`.
    function _group(Tree tree, Leaf calldata leaf) private pure returns (uint256) {
        return tree == Tree.Payer
            ? uint160(leaf.request.payer)
            : (uint256(leaf.request.adapterId) << 32) | leaf.record.termsVersion;
    }

    /// @dev Strict lexicographic order of the two leaves' keys in `tree`: (group, payer, cumulativeCap).
    function _less(Tree tree, Leaf calldata a, Leaf calldata b) private pure returns (bool) {
        (uint256 ga, uint256 gb) = (_group(tree, a), _group(tree, b));
        if (ga != gb) return ga < gb;
        if (a.request.payer != b.request.payer) return a.request.payer < b.request.payer;
        return a.request.cumulativeCap < b.request.cumulativeCap;
    }
}
