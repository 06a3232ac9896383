// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @notice What a payer (or a signer it authorised) signs to buy one inference (EIP-712 type).
/// `node` and `promptHash` bind the request to one node and one prompt, so it cannot be replayed elsewhere.
/// `inputTokens` is counted by the client (the base model's tokenizer and chat template) and signed, so
/// the node cannot bill more. The request authorises the charge interval
/// `(cumulativeCap - maxCharge, cumulativeCap]`: `cumulativeCap` is the running total of the caps the payer
/// has signed for this node, and two requests of one payer for one node conflict iff their intervals overlap.
struct InferenceRequest {
    address payer;
    address node;
    uint64 adapterId;
    bytes32 promptHash;
    uint32 inputTokens;
    uint32 maxTokens;
    uint128 maxCharge;
    uint128 cumulativeCap;
    uint64 deadline;
}

/// @notice What a node signs for each answer (EIP-712 type). `requestDigest` is the EIP-712 digest of the
/// request; payer, adapter and input tokens are read from the request it names.
/// `charge = adapterAmount + nodeFeePerToken(servedAt) * (inputTokens + outputTokens)`.
struct UsageRecord {
    bytes32 requestDigest;
    uint32 termsVersion;
    uint32 outputTokens;
    uint128 adapterAmount;
    uint128 charge;
    bytes32 responseHash;
    uint64 servedAt;
}

/// @notice One batch leaf: the signed request and its usage record. Leaf hash:
/// keccak256(bytes.concat(keccak256(abi.encode(leaf)))) (double hash, the OpenZeppelin way).
struct Leaf {
    InferenceRequest request;
    uint8 v;
    bytes32 r;
    bytes32 s;
    UsageRecord record;
}

/// @notice A signed request shown at commit as a payer's spending authorisation: its `cumulativeCap`
/// bounds everything the node has ever collected from that payer.
struct Voucher {
    InferenceRequest request;
    uint8 v;
    bytes32 r;
    bytes32 s;
}

/// @notice A Merkle-sum tree node. Internal node hash: keccak256(abi.encode(left.hash, left.sum,
/// right.hash, right.sum)), sum = left.sum + right.sum. An empty (padding) leaf is (0, 0).
struct SumNode {
    bytes32 hash;
    uint256 sum;
}

/// @notice Charge of one payer in a batch.
struct PayerTotal {
    address payer;
    uint128 amount;
}

/// @notice Adapter revenue of one (adapter, terms version) in a batch.
struct AdapterTotal {
    uint64 adapterId;
    uint32 termsVersion;
    uint128 amount;
}

/// @notice The per-payer and per-adapter totals a batch commits to, each list strictly sorted by key.
struct BatchTotals {
    PayerTotal[] payers;
    AdapterTotal[] adapters;
}

/// @title UsageTypes
/// @notice EIP-712 type hashes and struct hashes of the signed types, the leaf hash, and the overlap rule
/// of charge intervals. The type strings must equal `attribution/types.py` character for character.
library UsageTypes {
    bytes32 internal constant INFERENCE_REQUEST_TYPEHASH = keccak256(
        "InferenceRequest(address payer,address node,uint64 adapterId,bytes32 promptHash,uint32 inputTokens,uint32 maxTokens,uint128 maxCharge,uint128 cumulativeCap,uint64 deadline)"
    );
    bytes32 internal constant USAGE_RECORD_TYPEHASH = keccak256(
        "UsageRecord(bytes32 requestDigest,uint32 termsVersion,uint32 outputTokens,uint128 adapterAmount,uint128 charge,bytes32 responseHash,uint64 servedAt)"
    );

    /// @notice EIP-712 struct hash of a request: all members are static, so this is one abi.encode.
    function hash(InferenceRequest calldata request) internal pure returns (bytes32) {
        return keccak256(abi.encode(INFERENCE_REQUEST_TYPEHASH, request));
    }

    /// @notice EIP-712 struct hash of a usage record.
    function hash(UsageRecord calldata record) internal pure returns (bytes32) {
        return keccak256(abi.encode(USAGE_RECORD_TYPEHASH, record));
    }

    /// @notice Double-hashed leaf (a 32-byte preimage can never be mistaken for a 128-byte internal node).
    function leafHash(Leaf calldata leaf) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(leaf))));
    }

    /// @notice Whether the charge intervals `(cap - maxCharge, cap]` of two requests overlap (the same
    /// interval counts). Written without subtraction, so a malformed interval cannot underflow.
    function overlaps(InferenceRequest calldata a, InferenceRequest calldata b) internal pure returns (bool) {
        return uint256(a.cumulativeCap) < uint256(b.cumulativeCap) + a.maxCharge
            && uint256(b.cumulativeCap) < uint256(a.cumulativeCap) + b.maxCharge;
    }
}
