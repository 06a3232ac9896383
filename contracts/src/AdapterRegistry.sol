// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title AdapterRegistry
/// @notice Registry of LoRA adapters, identified on chain by a sequential id and off chain by their IPFS
/// CID. Each adapter has a list of *terms versions*: prices (OPEN wei per input and per output token) and
/// a contributor split in basis points. A change never alters what was already served: it appends a new
/// version that takes effect `noticePeriod` seconds later, and a usage record is priced and split by the
/// version in force at its `servedAt` ({versionAt}). Retiring appends a final version that serves nothing.
/// A *name* (what a request's `model` says) points at one adapter; its owner can move it to another adapter
/// it owns, e.g. a new version of the adapter registered under its new CID ({setName}). A free name is
/// claimed in two steps, commit then reveal ({commitName}, {setName} at least `nameCommitDelay` later), so
/// nobody who sees the claim in the mempool can take the name first: their own commitment would be too new.
contract AdapterRegistry {
    /// @notice Upper bound on contributors per adapter: keeps revenue distribution a bounded loop.
    uint256 public constant MAX_CONTRIBUTORS = 16;
    /// @notice Longest adapter name, in bytes.
    uint256 public constant MAX_NAME_LENGTH = 64;
    /// @notice How long a name commitment stays usable (seconds).
    uint64 public constant NAME_COMMIT_LIFETIME = 1 days;
    uint256 private constant _TOTAL_BPS = 10_000;

    struct Terms {
        uint64 since;
        bool retired;
        uint96 priceIn;
        uint96 priceOut;
        address[] contributors;
        uint16[] sharesBps;
    }

    struct Adapter {
        address owner;
        bytes32 baseModel;
        string cid;
    }

    /// @notice Delay between a terms change and the moment it takes effect (seconds).
    uint64 public immutable noticePeriod;
    /// @notice Shortest time between committing to a free name and claiming it (seconds): longer than a
    /// transaction can be held back from a block, so a claim seen in the mempool cannot be front-run.
    uint64 public immutable nameCommitDelay;

    uint64 private _adapterCount;
    mapping(uint64 adapterId => Adapter) private _adapters;
    mapping(uint64 adapterId => Terms[]) private _terms;
    mapping(bytes32 cidHash => uint64 adapterId) private _idByCid;
    mapping(bytes32 nameHash => uint64 adapterId) private _idByName;
    mapping(address committer => mapping(bytes32 commitment => uint64 committedAt)) private _nameCommits;

    event AdapterRegistered(uint64 indexed adapterId, address indexed owner, string cid, bytes32 baseModel);
    event AdapterTermsUpdated(
        uint64 indexed adapterId,
        uint32 indexed version,
        uint64 since,
        uint96 priceIn,
        uint96 priceOut,
        address[] contributors,
        uint16[] sharesBps
    );
    event AdapterRetired(uint64 indexed adapterId, uint32 indexed version, uint64 since);
    event AdapterOwnershipTransferred(uint64 indexed adapterId, address indexed previousOwner, address indexed newOwner);
    event AdapterNamed(string name, uint64 indexed adapterId, uint64 indexed previousAdapterId);

    error AdapterRegistryUnknownAdapter(uint64 adapterId);
    error AdapterRegistryUnknownVersion(uint64 adapterId, uint32 version);
    error AdapterRegistryNotOwner(uint64 adapterId, address caller);
    error AdapterRegistryEmptyCid();
    error AdapterRegistryDuplicateCid(string cid, uint64 existingId);
    error AdapterRegistrySharesLengthMismatch(uint256 contributors, uint256 shares);
    error AdapterRegistryBadContributorCount(uint256 count);
    error AdapterRegistryZeroContributor(uint256 index);
    error AdapterRegistryBadSharesSum(uint256 sum);
    error AdapterRegistryRetired(uint64 adapterId);
    error AdapterRegistryZeroOwner();
    error AdapterRegistryBadName(string name);
    error AdapterRegistryNameTaken(string name, uint64 adapterId);
    error AdapterRegistryNameNotCommitted(string name, uint64 committedAt);

    constructor(uint64 noticePeriod_, uint64 nameCommitDelay_) {
        noticePeriod = noticePeriod_;
        nameCommitDelay = nameCommitDelay_;
    }

    /// @notice Registers an adapter owned by the caller. Version 0 of its terms is in force immediately.
    /// @param cid IPFS CID (string form) of the adapter directory; unique.
    /// @param baseModel Identifier of the base model the adapter was trained on.
    /// @param priceIn OPEN wei per input token.
    /// @param priceOut OPEN wei per output token.
    /// @param contributors Accounts paid from the adapter's revenue.
    /// @param sharesBps Their shares in basis points, summing to 10,000.
    /// @return adapterId The new adapter's id (ids start at 1).
    function register(
        string calldata cid,
        bytes32 baseModel,
        uint96 priceIn,
        uint96 priceOut,
        address[] calldata contributors,
        uint16[] calldata sharesBps
    ) external returns (uint64 adapterId) {
        if (bytes(cid).length == 0) revert AdapterRegistryEmptyCid();
        bytes32 cidHash = keccak256(bytes(cid));
        uint64 existing = _idByCid[cidHash];
        if (existing != 0) revert AdapterRegistryDuplicateCid(cid, existing);
        _checkSplit(contributors, sharesBps);

        adapterId = ++_adapterCount;
        _idByCid[cidHash] = adapterId;
        _adapters[adapterId] = Adapter({owner: msg.sender, baseModel: baseModel, cid: cid});
        emit AdapterRegistered(adapterId, msg.sender, cid, baseModel);
        _appendTerms(adapterId, uint64(block.timestamp), priceIn, priceOut, contributors, sharesBps);
    }

    /// @notice Schedules new prices, keeping the current split. Takes effect after `noticePeriod`.
    /// @return version The new terms version.
    function updatePrices(uint64 adapterId, uint96 priceIn, uint96 priceOut) external returns (uint32 version) {
        Terms storage current = _latestActive(adapterId);
        return _appendTerms(
            adapterId, _effectiveAt(), priceIn, priceOut, current.contributors, current.sharesBps
        );
    }

    /// @notice Schedules a new contributor split, keeping the current prices. Takes effect after `noticePeriod`.
    /// @return version The new terms version.
    function updateShares(uint64 adapterId, address[] calldata contributors, uint16[] calldata sharesBps)
        external
        returns (uint32 version)
    {
        Terms storage current = _latestActive(adapterId);
        _checkSplit(contributors, sharesBps);
        return _appendTerms(adapterId, _effectiveAt(), current.priceIn, current.priceOut, contributors, sharesBps);
    }

    /// @notice Retires the adapter: requests served from `noticePeriod` seconds on are not payable.
    /// @return version The retiring version.
    function retire(uint64 adapterId) external returns (uint32 version) {
        Terms storage current = _latestActive(adapterId);
        uint64 since = _effectiveAt();
        Terms storage retiring = _terms[adapterId].push();
        retiring.since = since;
        retiring.retired = true;
        retiring.contributors = current.contributors;
        retiring.sharesBps = current.sharesBps;
        version = uint32(_terms[adapterId].length - 1);
        emit AdapterRetired(adapterId, version, since);
    }

    /// @notice Hands the adapter (the right to change its terms) to `newOwner`.
    function transferAdapterOwnership(uint64 adapterId, address newOwner) external {
        Adapter storage owned = _ownedAdapter(adapterId);
        if (newOwner == address(0)) revert AdapterRegistryZeroOwner();
        address previous = owned.owner;
        owned.owner = newOwner;
        emit AdapterOwnershipTransferred(adapterId, previous, newOwner);
    }

    /// @notice First step of claiming a free name: records `commitment` ({nameCommitment}) for the caller.
    /// It reveals nothing of the name; committing again restarts its clock.
    function commitName(bytes32 commitment) external {
        _nameCommits[msg.sender][commitment] = uint64(block.timestamp);
    }

    /// @notice What {commitName} takes to claim `name` for `adapterId`, with a secret random `salt`.
    function nameCommitment(string calldata name, uint64 adapterId, bytes32 salt) public pure returns (bytes32) {
        return keccak256(abi.encode(name, adapterId, salt));
    }

    /// @notice Points `name` at `adapterId`, which the caller owns and has not retired. A free name goes to
    /// the first caller who committed to it ({commitName}) between `nameCommitDelay` and
    /// `NAME_COMMIT_LIFETIME` seconds ago (the commitment is used up); a bound name can only be moved by the
    /// owner of the adapter it points to, with no commitment (`salt` is not read).
    /// @param name 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
    function setName(string calldata name, uint64 adapterId, bytes32 salt) external {
        _latestActive(adapterId);
        _checkName(name);
        bytes32 nameHash = keccak256(bytes(name));
        uint64 previous = _idByName[nameHash];
        if (previous == 0) {
            bytes32 commitment = nameCommitment(name, adapterId, salt);
            uint64 committedAt = _nameCommits[msg.sender][commitment];
            if (
                committedAt == 0 || block.timestamp < uint256(committedAt) + nameCommitDelay
                    || block.timestamp > uint256(committedAt) + NAME_COMMIT_LIFETIME
            ) revert AdapterRegistryNameNotCommitted(name, committedAt);
            delete _nameCommits[msg.sender][commitment];
        } else if (previous != adapterId && _adapters[previous].owner != msg.sender) {
            revert AdapterRegistryNameTaken(name, previous);
        }
        _idByName[nameHash] = adapterId;
        emit AdapterNamed(name, adapterId, previous);
    }

    /// @notice Id of the adapter `name` points to, 0 if none.
    function adapterIdByName(string calldata name) external view returns (uint64) {
        return _idByName[keccak256(bytes(name))];
    }

    /// @notice Number of registered adapters (the highest id).
    function adapterCount() external view returns (uint64) {
        return _adapterCount;
    }

    /// @notice Id of the adapter registered under `cid`, 0 if none.
    function adapterIdOf(string calldata cid) external view returns (uint64) {
        return _idByCid[keccak256(bytes(cid))];
    }

    /// @notice Static data of an adapter and its number of terms versions.
    function adapter(uint64 adapterId)
        external
        view
        returns (address owner, bytes32 baseModel, string memory cid, uint32 versionCount)
    {
        Adapter storage a = _existing(adapterId);
        return (a.owner, a.baseModel, a.cid, uint32(_terms[adapterId].length));
    }

    /// @notice Prices of one terms version.
    function terms(uint64 adapterId, uint32 version)
        external
        view
        returns (uint64 since, bool retired, uint96 priceIn, uint96 priceOut)
    {
        Terms storage t = _version(adapterId, version);
        return (t.since, t.retired, t.priceIn, t.priceOut);
    }

    /// @notice Contributor split of one terms version.
    function split(uint64 adapterId, uint32 version)
        external
        view
        returns (address[] memory contributors, uint16[] memory sharesBps)
    {
        Terms storage t = _version(adapterId, version);
        return (t.contributors, t.sharesBps);
    }

    /// @notice The terms version in force at `timestamp`: the last one whose `since` is not after it.
    /// @return found False when the adapter is unknown or `timestamp` precedes its registration.
    function versionAt(uint64 adapterId, uint64 timestamp)
        external
        view
        returns (bool found, uint32 version, bool retired, uint96 priceIn, uint96 priceOut)
    {
        Terms[] storage history = _terms[adapterId];
        uint256 low = 0;
        uint256 high = history.length;
        // Binary search for the first version with since > timestamp.
        while (low < high) {
            uint256 mid = (low + high) / 2;
            if (history[mid].since > timestamp) high = mid;
            else low = mid + 1;
        }
        if (low == 0) return (false, 0, false, 0, 0);
        Terms storage t = history[low - 1];
        return (true, uint32(low - 1), t.retired, t.priceIn, t.priceOut);
    }

    function _appendTerms(
        uint64 adapterId,
        uint64 since,
        uint96 priceIn,
        uint96 priceOut,
        address[] memory contributors,
        uint16[] memory sharesBps
    ) private returns (uint32 version) {
        Terms storage t = _terms[adapterId].push();
        t.since = since;
        t.priceIn = priceIn;
        t.priceOut = priceOut;
        t.contributors = contributors;
        t.sharesBps = sharesBps;
        version = uint32(_terms[adapterId].length - 1);
        emit AdapterTermsUpdated(adapterId, version, since, priceIn, priceOut, contributors, sharesBps);
    }

    function _effectiveAt() private view returns (uint64) {
        return uint64(block.timestamp) + noticePeriod;
    }

    function _existing(uint64 adapterId) private view returns (Adapter storage a) {
        a = _adapters[adapterId];
        if (a.owner == address(0)) revert AdapterRegistryUnknownAdapter(adapterId);
    }

    function _ownedAdapter(uint64 adapterId) private view returns (Adapter storage a) {
        a = _existing(adapterId);
        if (a.owner != msg.sender) revert AdapterRegistryNotOwner(adapterId, msg.sender);
    }

    function _latestActive(uint64 adapterId) private view returns (Terms storage t) {
        _ownedAdapter(adapterId);
        Terms[] storage history = _terms[adapterId];
        t = history[history.length - 1];
        if (t.retired) revert AdapterRegistryRetired(adapterId);
    }

    function _version(uint64 adapterId, uint32 version) private view returns (Terms storage) {
        _existing(adapterId);
        Terms[] storage history = _terms[adapterId];
        if (version >= history.length) revert AdapterRegistryUnknownVersion(adapterId, version);
        return history[version];
    }

    function _checkName(string calldata name) private pure {
        bytes calldata b = bytes(name);
        if (b.length == 0 || b.length > MAX_NAME_LENGTH) revert AdapterRegistryBadName(name);
        for (uint256 i = 0; i < b.length; ++i) {
            bytes1 c = b[i];
            bool alnum = (c >= "0" && c <= "9") || (c >= "A" && c <= "Z") || (c >= "a" && c <= "z");
            if (!alnum && (i == 0 || (c != "." && c != "_" && c != "-"))) revert AdapterRegistryBadName(name);
        }
    }

    function _checkSplit(address[] calldata contributors, uint16[] calldata sharesBps) private pure {
        if (contributors.length != sharesBps.length) {
            revert AdapterRegistrySharesLengthMismatch(contributors.length, sharesBps.length);
        }
        if (contributors.length == 0 || contributors.length > MAX_CONTRIBUTORS) {
            revert AdapterRegistryBadContributorCount(contributors.length);
        }
        uint256 sum = 0;
        for (uint256 i = 0; i < contributors.length; ++i) {
            if (contributors[i] == address(0)) revert AdapterRegistryZeroContributor(i);
            sum += sharesBps[i];
        }
        if (sum != _TOTAL_BPS) revert AdapterRegistryBadSharesSum(sum);
    }
}
