"""Merkle-sum tree, batch building, vouchers and the batch file (pure Python; the contract side is in
test_settlement.py and test_fraud.py)."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.aggregation import BatchLeaf, Tree, Voucher, build_batch, load_batch
from attribution.merkle import EMPTY, SumNode, SumTree, climb, depth_for
from attribution.signing import recover, sign_request, sign_usage_record
from attribution.types import Domain, InferenceRequest, UsageRecord

DOMAIN = Domain(31337, "0x" + "12" * 20)
NODE = Account.from_key(b"\x09" * 32)
PAYERS = [Account.from_key(bytes([i]) * 32) for i in range(1, 4)]
_caps: dict[int, int] = {}


def leaf(payer: int, adapter: int, charge: int, cap: int | None = None) -> BatchLeaf:
    """A leaf whose interval follows the payer's previous one (or ends at `cap`)."""
    account = PAYERS[payer]
    if cap is None:
        cap = _caps[payer] = _caps.get(payer, 0) + charge
    request = InferenceRequest(account.address, NODE.address, adapter, secrets.token_bytes(32), 3, 10,
                               charge, cap, 1_000)
    record = UsageRecord(request.digest(DOMAIN), 0, 4, charge // 2, charge, bytes(32), 900)
    return BatchLeaf(request, sign_request(request, DOMAIN, account.key), record,
                     sign_usage_record(record, DOMAIN, NODE.key))


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


def test_batch_orders_totals_ranges_and_vouchers() -> None:
    leaves = [leaf(p, a, 10 * (p + 1) + a) for p in range(3) for a in (2, 1) for _ in range(2)]
    batch = build_batch(leaves)
    assert batch.count == 12 and batch.depth == 4
    for tree in Tree:
        keys = [x.key(tree) for x in batch.leaves(tree)]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert sorted(x.hash for x in batch.leaves(tree)) == sorted(x.hash for x in leaves)
    assert sum(a for _, a in batch.payer_totals) == batch.payer_tree.root.sum == batch.charge
    assert sum(a for *_, a in batch.adapter_totals) == batch.adapter_tree.root.sum
    for (payer, amount), voucher in zip(batch.payer_totals, batch.vouchers, strict=True):
        start, end = batch.group_range(Tree.PAYER, int(payer, 16))
        mine = batch.payer_leaves[start:end]
        assert end - start == 4 and sum(x.record.charge for x in mine) == amount
        # The voucher: the payer's highest-cap request, which covers the whole batch charge.
        assert voucher.request == max(mine, key=lambda x: x.request.cumulative_cap).request
        assert voucher.request.cumulative_cap >= amount
    assert batch.group_range(Tree.PAYER, 1) == (0, 0)
    assert batch.group_range(Tree.PAYER, 2**160 - 1) == (12, 12)


def test_zero_totals_are_left_out() -> None:
    free = leaf(0, 1, 0, cap=10**6)
    paid = leaf(1, 2, 8)
    batch = build_batch([free, paid])
    assert batch.payer_totals == [(paid.request.payer, 8)]
    assert batch.adapter_totals == [(2, 0, 4)]
    assert [v.request.payer for v in batch.vouchers] == [paid.request.payer]
    with pytest.raises(ValueError, match="at least one payer"):
        build_batch([free])


def test_a_higher_voucher_from_outside_the_batch_is_used() -> None:
    inside = leaf(2, 1, 5)
    later = leaf(2, 1, 7)  # signed later, served in the next batch
    lower = Voucher(inside.request, inside.signature)
    assert build_batch([inside], {inside.request.payer: later.voucher}).vouchers == [later.voucher]
    assert build_batch([inside], {inside.request.payer: lower}).vouchers == [inside.voucher]


def test_batch_file_round_trips_and_keeps_the_signatures() -> None:
    leaves = [leaf(p, a, 5 + p + a) for p in range(3) for a in (1, 2)]
    batch = build_batch(leaves)
    data = batch.file_bytes(DOMAIN.chain_id, DOMAIN.verifying_contract, NODE.address)
    parsed = load_batch(data)
    assert (parsed.chain_id, parsed.node) == (31337, NODE.address)
    assert parsed.batch.payer_leaves == batch.payer_leaves and parsed.batch.vouchers == batch.vouchers
    assert parsed.batch.commitment("x") == batch.commitment("x") and parsed.batch.totals() == batch.totals()
    for item in parsed.batch.payer_leaves:  # every signature an auditor needs is in the file
        assert recover(item.request.digest(DOMAIN), item.signature) == item.request.payer
        assert item.record_signature is not None
        assert recover(item.record.digest(DOMAIN), item.record_signature) == NODE.address
    with pytest.raises(ValueError, match="version"):
        load_batch(data.replace(b'"version":2', b'"version":1'))
    with pytest.raises(ValueError, match="JSON"):
        load_batch(b"{")
    with pytest.raises(ValueError, match="malformed"):
        load_batch(b'{"version":2}')


def test_build_batch_needs_leaves() -> None:
    with pytest.raises(ValueError):
        build_batch([])
