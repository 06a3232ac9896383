"""Aggregation: signed requests and usage records -> a batch ready to commit, its file, and its proofs.

A batch commits the same leaves (signed request + usage record) twice (see `docs/contracts.md`):

* the payer tree, sorted by (payer, cumulativeCap), summing charges: each payer's charge is a contiguous range;
* the adapter tree, sorted by (adapterId, termsVersion, payer, cumulativeCap), summing adapter amounts: each
  (adapter, version)'s revenue is a contiguous range.

With the roots go the totals (per payer, per (adapter, version); a total of 0 is left out, as the contract
requires) and one voucher per payer: a request that payer signed for the node whose `cumulativeCap` covers
everything the node has collected from it, this batch included. By default it is the payer's highest-cap
request among the leaves; a node passes its own best vouchers (the highest-cap request each payer ever
signed for it) when older batches held higher ones.

`build_batch` makes the honest batch; the `*_proof` and `boundary` methods produce the ABI tuples the
contract's fraud proofs take. The batch file (`Batch.file_bytes`, `load_batch`) holds everything an auditor
needs to rebuild the commit and check every leaf: each signed request, its record, the node's signature of
the record, the vouchers and the domain.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from attribution.merkle import SumNode, SumTree, depth_for
from attribution.types import (
    RECORD_FIELDS,
    REQUEST_FIELDS,
    InferenceRequest,
    Signature,
    UsageRecord,
    encode_word,
    encode_words,
)

BATCH_FILE_VERSION = 2


class Tree(IntEnum):
    """The two trees of a batch (values as the contract's `Tree` enum)."""

    PAYER = 0
    ADAPTER = 1

    @property
    def other(self) -> Tree:
        return Tree.ADAPTER if self is Tree.PAYER else Tree.PAYER


# (group, payer, cumulativeCap): group is the payer (payer tree) or adapterId << 32 | termsVersion.
Key = tuple[int, int, int]
PayerTotals = list[tuple[str, int]]
AdapterTotals = list[tuple[int, int, int]]


def price(price_in: int, price_out: int, fee_per_token: int, input_tokens: int, output_tokens: int) -> tuple[int, int]:
    """(adapterAmount, charge) of a record, as the contract recomputes them (prices 0 for the base model)."""
    adapter_amount = price_in * input_tokens + price_out * output_tokens
    return adapter_amount, adapter_amount + fee_per_token * (input_tokens + output_tokens)


def adapter_group(adapter_id: int, terms_version: int) -> int:
    return (adapter_id << 32) | terms_version


@dataclass(frozen=True, slots=True)
class Voucher:
    """A signed request shown at commit: its `cumulativeCap` bounds what the node may have collected."""

    request: InferenceRequest
    signature: Signature

    def as_abi(self) -> tuple[Any, ...]:
        return (self.request.as_tuple(), self.signature.v, self.signature.r, self.signature.s)

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request.to_wire(), "signature": self.signature.to_hex()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Voucher:
        return cls(InferenceRequest.from_wire(data["request"]), Signature.from_hex(data["signature"]))


@dataclass(frozen=True, slots=True)
class BatchLeaf:
    """One signed request and the node's usage record for it (with the node's signature of the record,
    which the file carries for auditors; the tree leaf does not include it)."""

    request: InferenceRequest
    signature: Signature
    record: UsageRecord
    record_signature: Signature | None = field(default=None, compare=False)
    hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", keccak(keccak(self.encode())))

    def encode(self) -> bytes:
        """abi.encode(leaf): every member is static, so this is the concatenation of 32-byte words."""
        return (
            encode_words(REQUEST_FIELDS, self.request.as_tuple())
            + encode_word("uint8", self.signature.v)
            + self.signature.r
            + self.signature.s
            + encode_words(RECORD_FIELDS, self.record.as_tuple())
        )

    def key(self, tree: Tree) -> Key:
        payer = int(self.request.payer, 16)
        if tree is Tree.PAYER:
            return (payer, payer, self.request.cumulative_cap)
        return (adapter_group(self.request.adapter_id, self.record.terms_version), payer, self.request.cumulative_cap)

    def amount(self, tree: Tree) -> int:
        return self.record.charge if tree is Tree.PAYER else self.record.adapter_amount

    def node(self, tree: Tree) -> SumNode:
        return SumNode(self.hash, self.amount(tree))

    def as_abi(self) -> tuple[Any, ...]:
        return (self.request.as_tuple(), self.signature.v, self.signature.r, self.signature.s, self.record.as_tuple())

    @property
    def voucher(self) -> Voucher:
        return Voucher(self.request, self.signature)

    def to_json(self) -> dict[str, Any]:
        data = {"request": self.request.to_wire(), "requestSignature": self.signature.to_hex(),
                "record": self.record.to_wire()}
        if self.record_signature is not None:
            data["recordSignature"] = self.record_signature.to_hex()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchLeaf:
        record_signature = data.get("recordSignature")
        return cls(
            InferenceRequest.from_wire(data["request"]),
            Signature.from_hex(data["requestSignature"]),
            UsageRecord.from_wire(data["record"]),
            None if record_signature is None else Signature.from_hex(record_signature),
        )


_EMPTY_LEAF_ABI = (
    ("0x" + "00" * 20, "0x" + "00" * 20, 0, bytes(32), 0, 0, 0, 0, 0),
    0,
    bytes(32),
    bytes(32),
    (bytes(32), 0, 0, 0, 0, bytes(32), 0),
)


@dataclass
class Batch:
    """A batch ready to commit: leaves in tree order, both trees, both total lists, one voucher per payer
    total (same order)."""

    payer_leaves: list[BatchLeaf]
    adapter_leaves: list[BatchLeaf]
    payer_tree: SumTree
    adapter_tree: SumTree
    payer_totals: PayerTotals
    adapter_totals: AdapterTotals
    vouchers: list[Voucher]

    @property
    def depth(self) -> int:
        return self.payer_tree.depth

    @property
    def count(self) -> int:
        return len(self.payer_leaves)

    @property
    def charge(self) -> int:
        """What the batch charges its payers in all."""
        return self.payer_tree.root.sum

    def leaves(self, tree: Tree) -> list[BatchLeaf]:
        return self.payer_leaves if tree is Tree.PAYER else self.adapter_leaves

    def tree(self, tree: Tree) -> SumTree:
        return self.payer_tree if tree is Tree.PAYER else self.adapter_tree

    def commitment(self, cid: str, commit_by: int = 2**64 - 1) -> tuple[Any, ...]:
        """`UsageSettlement.Commitment` tuple. The commit reverts if mined after `commit_by` (chain time): a
        node sets it to the earliest `deadline + maxCommitDelay` among the records (`Submitter._commit`)."""
        return (
            self.payer_tree.root.hash,
            self.payer_tree.root.sum,
            self.adapter_tree.root.hash,
            self.adapter_tree.root.sum,
            self.depth,
            self.count,
            commit_by,
            cid,
        )

    def totals(self) -> tuple[PayerTotals, AdapterTotals]:
        """`BatchTotals` tuple."""
        return (list(self.payer_totals), list(self.adapter_totals))

    def vouchers_abi(self) -> list[tuple[Any, ...]]:
        return [voucher.as_abi() for voucher in self.vouchers]

    def leaf_proof(self, tree: Tree, index: int) -> tuple[Any, ...]:
        """`LeafProof` of slot `index` (a record or an empty slot)."""
        leaves = self.leaves(tree)
        siblings = [n.as_tuple() for n in self.tree(tree).proof(index)]
        if index < len(leaves):
            return (index, False, leaves[index].as_abi(), siblings)
        return (index, True, _EMPTY_LEAF_ABI, siblings)

    def node_proof(self, tree: Tree, level: int, index: int) -> tuple[tuple[bytes, int], list[tuple[bytes, int]]]:
        """(node, siblings) of an internal node, for `proveNodeSumMismatch`."""
        t = self.tree(tree)
        return t.node(level, index).as_tuple(), [n.as_tuple() for n in t.proof(index, level)]

    def boundary(self, tree: Tree, position: int) -> tuple[Any, ...]:
        """`Boundary` between slots position-1 and position (either may be a placeholder at the ends)."""
        width = 1 << self.depth
        before = self.leaf_proof(tree, position - 1) if position > 0 else self.leaf_proof(tree, 0)
        at = self.leaf_proof(tree, position) if position < width else self.leaf_proof(tree, width - 1)
        return (position, before, at)

    def _keys(self, tree: Tree) -> list[Key]:
        return [leaf.key(tree) for leaf in self.leaves(tree)]

    def group_range(self, tree: Tree, group: int) -> tuple[int, int]:
        """[start, end) slots of a payer (tree PAYER, group = int(address)) or an (adapter, version)
        (tree ADAPTER, group = adapterId << 32 | version); start == end when absent."""
        keys = self._keys(tree)
        # Past the last record comes an empty slot (or the end, 2**depth, of a full tree): both bound.
        return bisect.bisect_left(keys, (group, 0, 0)), bisect.bisect_left(keys, (group + 1, 0, 0))

    def total_boundaries(self, tree: Tree, entry: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(lower, upper) boundaries of a committed total's range, for `proveTotalMismatch`."""
        if tree is Tree.PAYER:
            group = int(self.payer_totals[entry][0], 16)
        else:
            adapter_id, version, _ = self.adapter_totals[entry]
            group = adapter_group(adapter_id, version)
        start, end = self.group_range(tree, group)
        return self.boundary(tree, start), self.boundary(tree, end)

    def missing_slot(self, tree: Tree, leaf: BatchLeaf) -> tuple[Any, ...]:
        """`Boundary` in `tree` where `leaf` would be: the first slot whose key is >= its key."""
        position = bisect.bisect_left(self._keys(tree), leaf.key(tree))
        return self.boundary(tree, position)

    def index_of(self, tree: Tree, leaf: BatchLeaf) -> int:
        return next(i for i, other in enumerate(self.leaves(tree)) if other.hash == leaf.hash)

    def file_bytes(self, chain_id: int, settlement: str, node: str) -> bytes:
        """The batch file pinned to IPFS (its CID goes into the commit): the domain, the node, the leaves in
        payer-tree order and the vouchers. `load_batch` rebuilds this batch from it."""
        return json.dumps(
            {
                "version": BATCH_FILE_VERSION,
                "chainId": str(chain_id),
                "settlement": to_checksum_address(settlement),
                "node": to_checksum_address(node),
                "leaves": [leaf.to_json() for leaf in self.payer_leaves],
                "vouchers": [voucher.to_json() for voucher in self.vouchers],
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()


def sorted_leaves(leaves: Iterable[BatchLeaf], tree: Tree) -> list[BatchLeaf]:
    return sorted(leaves, key=lambda leaf: leaf.key(tree))


def honest_totals(leaves: Iterable[BatchLeaf]) -> tuple[PayerTotals, AdapterTotals]:
    """Per-payer charges and per-(adapter, version) revenues, sorted, zero totals left out."""
    payers: dict[int, int] = {}
    adapters: dict[tuple[int, int], int] = {}
    for leaf in leaves:
        payer = int(leaf.request.payer, 16)
        payers[payer] = payers.get(payer, 0) + leaf.record.charge
        cell = (leaf.request.adapter_id, leaf.record.terms_version)
        adapters[cell] = adapters.get(cell, 0) + leaf.record.adapter_amount
    return (
        [(to_checksum_address(p.to_bytes(20, "big")), amount) for p, amount in sorted(payers.items()) if amount],
        [(a, v, amount) for (a, v), amount in sorted(adapters.items()) if amount],
    )


def best_vouchers(leaves: Iterable[BatchLeaf]) -> dict[str, Voucher]:
    """Per payer, its request with the highest `cumulativeCap` among `leaves`."""
    best: dict[str, Voucher] = {}
    for leaf in leaves:
        payer = to_checksum_address(leaf.request.payer)
        if payer not in best or leaf.request.cumulative_cap > best[payer].request.cumulative_cap:
            best[payer] = leaf.voucher
    return best


def build_batch(leaves: Iterable[BatchLeaf], vouchers: Mapping[str, Voucher] | None = None) -> Batch:
    """The honest batch of `leaves`: both sort orders, honest sums and totals, one voucher per charged
    payer: `vouchers[payer]` when given and higher than the payer's best leaf, else that leaf's request."""
    leaves = list(leaves)
    if not leaves:
        raise ValueError("a batch needs at least one leaf")
    payer_totals, adapter_totals = honest_totals(leaves)
    if not payer_totals:
        raise ValueError("a batch must charge at least one payer (all charges are 0)")
    chosen = best_vouchers(leaves)
    for payer, voucher in (vouchers or {}).items():
        payer = to_checksum_address(payer)
        if payer in chosen and voucher.request.cumulative_cap > chosen[payer].request.cumulative_cap:
            chosen[payer] = voucher
    payer_leaves, adapter_leaves = sorted_leaves(leaves, Tree.PAYER), sorted_leaves(leaves, Tree.ADAPTER)
    depth = depth_for(len(leaves))
    return Batch(
        payer_leaves=payer_leaves,
        adapter_leaves=adapter_leaves,
        payer_tree=SumTree([leaf.node(Tree.PAYER) for leaf in payer_leaves], depth),
        adapter_tree=SumTree([leaf.node(Tree.ADAPTER) for leaf in adapter_leaves], depth),
        payer_totals=payer_totals,
        adapter_totals=adapter_totals,
        vouchers=[chosen[payer] for payer, _ in payer_totals],
    )


@dataclass(frozen=True)
class BatchFile:
    """A parsed batch file: where it settles, whose it is, and the batch rebuilt from its leaves."""

    chain_id: int
    settlement: str
    node: str
    batch: Batch


def load_batch(data: bytes) -> BatchFile:
    """Parses a batch file written by `Batch.file_bytes` and rebuilds the batch from its leaves and
    vouchers; raises ValueError on another version or malformed content."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"a batch file is JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != BATCH_FILE_VERSION:
        version = document.get("version") if isinstance(document, dict) else None
        raise ValueError(f"unsupported batch file version {version!r} (expected {BATCH_FILE_VERSION})")
    try:
        leaves = [BatchLeaf.from_json(item) for item in document["leaves"]]
        vouchers = [Voucher.from_json(item) for item in document["vouchers"]]
        chain_id, settlement, node = int(document["chainId"]), document["settlement"], document["node"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed batch file: {exc!r}") from None
    batch = build_batch(leaves, {v.request.payer: v for v in vouchers})
    return BatchFile(chain_id, to_checksum_address(settlement), to_checksum_address(node), batch)

