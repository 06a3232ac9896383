"""Merkle-sum tree as `UsageSettlement` verifies it.

Layout: a complete binary tree of height `depth` over 2**depth leaf slots. Records fill slots
[0, n) in key order; slots [n, 2**depth) hold the empty leaf (hash 0, sum 0). Every internal node is

    hash = keccak256(left.hash || left.sum || right.hash || right.sum)   (4 x 32 bytes, abi.encode)
    sum  = left.sum + right.sum

so a parent commits to its children's sums and a proof is the list of sibling (hash, sum) pairs from the
leaf up. A leaf's hash is the double keccak of its ABI encoding (computed by `attribution.aggregation`); its
sum is the record's charge (payer tree) or adapter amount (adapter tree).

Worked example, depth 2, leaves a, b, c and one empty slot:

    level 2                  root = H(ab, c0)            sum = a+b+c
    level 1        ab = H(a, b)          c0 = H(c, empty)
    level 0       a         b           c         empty

The proof of c (index 2) is [empty, ab]; the sum of the leaves left of c is ab.sum (the left siblings'
sums), which is how a range total is proven from its two boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_hash.auto import keccak

MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class SumNode:
    hash: bytes
    sum: int

    def as_tuple(self) -> tuple[bytes, int]:
        return (self.hash, self.sum)


EMPTY = SumNode(bytes(32), 0)


def parent(left: SumNode, right: SumNode) -> SumNode:
    return SumNode(
        keccak(left.hash + left.sum.to_bytes(32, "big") + right.hash + right.sum.to_bytes(32, "big")),
        left.sum + right.sum,
    )


def depth_for(count: int) -> int:
    """Smallest depth whose 2**depth slots hold `count` leaves (0 for one leaf)."""
    return max(0, (count - 1).bit_length())


class SumTree:
    """All levels of a Merkle-sum tree; `levels[0]` are the leaf slots, `levels[depth]` the root."""

    def __init__(self, leaves: Sequence[SumNode], depth: int | None = None) -> None:
        self.depth = depth_for(len(leaves)) if depth is None else depth
        if not 0 <= self.depth <= MAX_DEPTH or len(leaves) > 1 << self.depth:
            raise ValueError(f"{len(leaves)} leaves do not fit depth {self.depth}")
        self.levels: list[list[SumNode]] = [list(leaves) + [EMPTY] * ((1 << self.depth) - len(leaves))]
        for _ in range(self.depth):
            below = self.levels[-1]
            self.levels.append([parent(below[2 * i], below[2 * i + 1]) for i in range(len(below) // 2)])

    @property
    def root(self) -> SumNode:
        return self.levels[self.depth][0]

    def node(self, level: int, index: int) -> SumNode:
        return self.levels[level][index]

    def proof(self, index: int, level: int = 0) -> list[SumNode]:
        """Sibling nodes from (`level`, `index`) up to (not including) the root."""
        siblings = []
        for height in range(level, self.depth):
            siblings.append(self.levels[height][index ^ 1])
            index >>= 1
        return siblings


def climb(depth: int, level: int, index: int, node: SumNode, siblings: Sequence[SumNode]) -> tuple[SumNode, int]:
    """What the contract computes: the root reached from a node and its proof, and the sum of the
    leaves left of the node."""
    if len(siblings) != depth - level:
        raise ValueError("proof length does not match the tree height")
    left_sum = 0
    for i, sibling in enumerate(siblings):
        if (index >> i) & 1:
            left_sum += sibling.sum
            node = parent(sibling, node)
        else:
            node = parent(node, sibling)
    return node, left_sum
