"""Merkle-sum tree and batch building (pure Python; the contract side is in test_fraud.py)."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.batch import BatchLeaf, Tree, build_batch, parse_batch_file
from attribution.eip712 import Domain, InferenceRequest, UsageRecord, sign_request
from attribution.merkle import EMPTY, SumNode, SumTree, climb, depth_for

DOMAIN = Domain(31337, "0x" + "12" * 20)
PAYERS = [Account.from_key(bytes([i]) * 32) for i in range(1, 4)]


def leaf(payer: int, adapter: int, charge: int, nonce: int | None = None) -> BatchLeaf:
    account = PAYERS[payer]
    request = InferenceRequest(account.address, "0x" + "34" * 20, adapter, secrets.token_bytes(32), 10,
                               charge, secrets.randbits(64) if nonce is None else nonce, 1_000)
    record = UsageRecord(request.digest(DOMAIN), 0, 3, 4, charge // 2, charge, bytes(32), 900)
    return BatchLeaf(request, sign_request(request, DOMAIN, account.key), record)


@pytest.mark.parametrize(("count", "depth"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1024, 10), (1025, 11)])
def test_depth_for(count: int, depth: int) -> None:
    assert depth_for(count) == depth


@settings(max_examples=40, deadline=None)
@given(sums=st.lists(st.integers(0, 2**100), min_size=1, max_size=40))
def test_every_proof_climbs_to_the_root_with_its_prefix_sum(sums: list[int]) -> None:
    nodes = [SumNode(secrets.token_bytes(32), s) for s in sums]
    tree = SumTree(nodes)
    assert tree.root.sum == sum(sums)
    for index in range(1 << tree.depth):
        node = nodes[index] if index < len(nodes) else EMPTY
        root, left = climb(tree.depth, 0, index, node, tree.proof(index))
        assert root == tree.root and left == sum(sums[:index])
    for level in range(1, tree.depth + 1):
        root, _ = climb(tree.depth, level, 0, tree.node(level, 0), tree.proof(0, level))
        assert root == tree.root


def test_tree_rejects_too_many_leaves() -> None:
    with pytest.raises(ValueError):
        SumTree([EMPTY] * 5, depth=2)


def test_batch_orders_totals_and_ranges() -> None:
    leaves = [leaf(p, a, 10 * (p + 1) + a) for p in range(3) for a in (2, 1) for _ in range(2)]
    batch = build_batch(leaves)
    assert batch.count == 12 and batch.depth == 4
    for tree in Tree:
        keys = [x.key(tree) for x in batch.leaves(tree)]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert sorted(x.hash for x in batch.leaves(tree)) == sorted(x.hash for x in leaves)
    assert sum(a for _, a in batch.payer_totals) == batch.payer_tree.root.sum
    assert sum(a for *_, a in batch.adapter_totals) == batch.adapter_tree.root.sum
    for payer, amount in batch.payer_totals:
        start, end = batch.group_range(Tree.PAYER, int(payer, 16))
        assert end - start == 4 and sum(x.record.charge for x in batch.payer_leaves[start:end]) == amount
    assert batch.group_range(Tree.PAYER, 1) == (0, 0)
    assert batch.group_range(Tree.PAYER, 2**160 - 1) == (12, 12)
    assert parse_batch_file(batch.file_bytes()) == batch.payer_leaves


def test_build_batch_needs_leaves() -> None:
    with pytest.raises(ValueError):
        build_batch([])
