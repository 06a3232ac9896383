"""Usage batches: leaves, the two Merkle-sum trees, the committed totals, and proof generation.

A batch commits the same leaves twice (see `docs/contracts.md`):

* the payer tree, sorted by (payer, nonce), summing charges: each payer's charge is a contiguous range;
* the adapter tree, sorted by (adapterId, termsVersion, payer, nonce), summing adapter amounts: each
  (adapter, version)'s revenue is a contiguous range.

`build_batch` makes the honest batch. `assemble_batch` takes the leaf orders, totals and node overrides
as given, which is how tests (and a dishonest node) make the batches that fraud proofs catch. The
`*_proof` and `*boundary*` methods produce the ABI tuples `UsageSettlement`'s proof functions take.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from attribution.eip712 import (
    RECORD_FIELDS,
    REQUEST_FIELDS,
    InferenceRequest,
    Signature,
    UsageRecord,
    encode_word,
    encode_words,
)
from attribution.merkle import SumNode, SumTree, depth_for


class Tree(IntEnum):
    """The two trees of a batch (values as the contract's `Tree` enum)."""

    PAYER = 0
    ADAPTER = 1

    @property
    def other(self) -> Tree:
        return Tree.ADAPTER if self is Tree.PAYER else Tree.PAYER


Key = tuple[int, int]

def price(price_in: int, price_out: int, fee_per_token: int, input_tokens: int, output_tokens: int) -> tuple[int, int]:
    """(adapterAmount, charge) of a record, as the contract recomputes them."""
    adapter_amount = price_in * input_tokens + price_out * output_tokens
    return adapter_amount, adapter_amount + fee_per_token * (input_tokens + output_tokens)


@dataclass(frozen=True, slots=True)
class BatchLeaf:
    """One signed request and the node's usage record for it."""

    request: InferenceRequest
    signature: Signature
    record: UsageRecord
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
            return (payer, self.request.nonce)
        return ((self.request.adapter_id << 32) | self.record.terms_version, (payer << 64) | self.request.nonce)

    def amount(self, tree: Tree) -> int:
        return self.record.charge if tree is Tree.PAYER else self.record.adapter_amount

    def node(self, tree: Tree) -> SumNode:
        return SumNode(self.hash, self.amount(tree))

    def as_abi(self) -> tuple[Any, ...]:
        return (self.request.as_tuple(), self.signature.v, self.signature.r, self.signature.s, self.record.as_tuple())

    def to_json(self) -> dict[str, Any]:
        def plain(values: dict[str, Any]) -> dict[str, Any]:
            return {k: ("0x" + v.hex() if isinstance(v, bytes) else v) for k, v in values.items()}

        return {
            "request": plain(self.request.message()),
            "signature": "0x" + self.signature.to_bytes().hex(),
            "record": plain(self.record.message()),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchLeaf:
        def typed(fields: tuple[tuple[str, str], ...], values: Mapping[str, Any]) -> list[Any]:
            out = []
            for name, abi_type in fields:
                value = values[name]
                if abi_type == "bytes32":
                    value = bytes.fromhex(value.removeprefix("0x"))
                elif abi_type == "address":
                    value = to_checksum_address(value)
                out.append(value)
            return out

        return cls(
            InferenceRequest(*typed(REQUEST_FIELDS, data["request"])),
            Signature.from_bytes(bytes.fromhex(data["signature"].removeprefix("0x"))),
            UsageRecord(*typed(RECORD_FIELDS, data["record"])),
        )


_EMPTY_LEAF_ABI = (
    ("0x" + "00" * 20, "0x" + "00" * 20, 0, bytes(32), 0, 0, 0, 0),
    0,
    bytes(32),
    bytes(32),
    (bytes(32), 0, 0, 0, 0, 0, bytes(32), 0),
)


@dataclass
class Batch:
    """A batch ready to commit: leaves in tree order, both trees and both total lists."""

    payer_leaves: list[BatchLeaf]
    adapter_leaves: list[BatchLeaf]
    payer_tree: SumTree
    adapter_tree: SumTree
    payer_totals: list[tuple[str, int]]
    adapter_totals: list[tuple[int, int, int]]

    @property
    def depth(self) -> int:
        return self.payer_tree.depth

    @property
    def count(self) -> int:
        return len(self.payer_leaves)

    def leaves(self, tree: Tree) -> list[BatchLeaf]:
        return self.payer_leaves if tree is Tree.PAYER else self.adapter_leaves

    def tree(self, tree: Tree) -> SumTree:
        return self.payer_tree if tree is Tree.PAYER else self.adapter_tree

    def commitment(self, cid: str) -> tuple[Any, ...]:
        """`UsageSettlement.Commitment` tuple."""
        return (
            self.payer_tree.root.hash,
            self.payer_tree.root.sum,
            self.adapter_tree.root.hash,
            self.adapter_tree.root.sum,
            self.depth,
            self.count,
            cid,
        )

    def totals(self) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
        """`BatchTotals` tuple."""
        return (list(self.payer_totals), list(self.adapter_totals))

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
        return bisect.bisect_left(keys, (group, 0)), bisect.bisect_left(keys, (group + 1, 0))

    def total_boundaries(self, tree: Tree, entry: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(lower, upper) boundaries of a committed total's range, for `proveTotalMismatch`."""
        if tree is Tree.PAYER:
            group = int(self.payer_totals[entry][0], 16)
        else:
            adapter_id, version, _ = self.adapter_totals[entry]
            group = (adapter_id << 32) | version
        start, end = self.group_range(tree, group)
        return self.boundary(tree, start), self.boundary(tree, end)

    def missing_slot(self, tree: Tree, leaf: BatchLeaf) -> tuple[Any, ...]:
        """`Boundary` in `tree` where `leaf` would be: the first slot whose key is >= its key."""
        position = bisect.bisect_left(self._keys(tree), leaf.key(tree))
        return self.boundary(tree, position)

    def index_of(self, tree: Tree, leaf: BatchLeaf) -> int:
        return next(i for i, other in enumerate(self.leaves(tree)) if other.hash == leaf.hash)

    def file_bytes(self) -> bytes:
        """The batch file pinned to IPFS: the leaves in payer-tree order (both trees, the totals and the
        roots are recomputed from it by `build_batch`)."""
        return json.dumps(
            {"version": 1, "leaves": [leaf.to_json() for leaf in self.payer_leaves]},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()


def sorted_leaves(leaves: Iterable[BatchLeaf], tree: Tree) -> list[BatchLeaf]:
    return sorted(leaves, key=lambda leaf: leaf.key(tree))


def honest_totals(leaves: Sequence[BatchLeaf]) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
    payers: dict[int, int] = {}
    adapters: dict[tuple[int, int], int] = {}
    for leaf in leaves:
        payer = int(leaf.request.payer, 16)
        payers[payer] = payers.get(payer, 0) + leaf.record.charge
        cell = (leaf.request.adapter_id, leaf.record.terms_version)
        adapters[cell] = adapters.get(cell, 0) + leaf.record.adapter_amount
    return (
        [(to_checksum_address(p.to_bytes(20, "big")), amount) for p, amount in sorted(payers.items())],
        [(a, v, amount) for (a, v), amount in sorted(adapters.items())],
    )


def assemble_batch(
    payer_leaves: Sequence[BatchLeaf],
    adapter_leaves: Sequence[BatchLeaf],
    *,
    depth: int | None = None,
    payer_totals: list[tuple[str, int]] | None = None,
    adapter_totals: list[tuple[int, int, int]] | None = None,
    payer_tamper: Mapping[tuple[int, int], SumNode] | None = None,
    adapter_tamper: Mapping[tuple[int, int], SumNode] | None = None,
) -> Batch:
    """Builds a batch from leaves in the given orders; totals default to the honest ones of the payer
    leaves, and `*_tamper` replaces tree nodes (see `SumTree`)."""
    if depth is None:
        depth = depth_for(max(len(payer_leaves), len(adapter_leaves)))
    honest_payers, honest_adapters = honest_totals(payer_leaves)
    return Batch(
        payer_leaves=list(payer_leaves),
        adapter_leaves=list(adapter_leaves),
        payer_tree=SumTree([leaf.node(Tree.PAYER) for leaf in payer_leaves], depth, payer_tamper),
        adapter_tree=SumTree([leaf.node(Tree.ADAPTER) for leaf in adapter_leaves], depth, adapter_tamper),
        payer_totals=honest_payers if payer_totals is None else payer_totals,
        adapter_totals=honest_adapters if adapter_totals is None else adapter_totals,
    )


def build_batch(leaves: Iterable[BatchLeaf]) -> Batch:
    """The honest batch of `leaves`: both sort orders, honest sums and totals."""
    leaves = list(leaves)
    if not leaves:
        raise ValueError("a batch needs at least one leaf")
    return assemble_batch(sorted_leaves(leaves, Tree.PAYER), sorted_leaves(leaves, Tree.ADAPTER))


def parse_batch_file(data: bytes) -> list[BatchLeaf]:
    """Leaves of a batch file written by `Batch.file_bytes`."""
    document = json.loads(data)
    if document.get("version") != 1:
        raise ValueError(f"unsupported batch file version {document.get('version')!r}")
    return [BatchLeaf.from_json(item) for item in document["leaves"]]
