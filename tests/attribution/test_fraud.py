"""Fraud proofs: an honest batch cannot be challenged; each cheat is proven, voids the batch, gives every
payer its charge and cap capacity back, slashes the node in proportion to the batch and rewards the
challenger that committed to its proof."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attribution.aggregation import Batch, BatchLeaf, Tree, build_batch, price, sorted_leaves
from attribution.chain import Chain
from attribution.deploy import Contracts
from attribution.merkle import EMPTY, SumNode
from attribution.types import SECP256K1_N, Signature
from tests.attribution.helpers import (
    CONFIG,
    DEPOSIT,
    NODE_FEE,
    NODE_STAKE,
    PRICES,
    World,
    assemble_batch,
    reverts,
)

WRONG_NODE, RECORD_MISMATCH, BAD_SIGNATURE, OUTSIDE_DEADLINE, OVER_CAP, WRONG_PRICE = 1, 2, 3, 4, 5, 6
SUM_MISMATCH, MISORDERED, TOTAL_MISMATCH, MISSING_RECORD, OVERLAP = 7, 8, 9, 10, 11


async def honest_leaves(world: World) -> list[BatchLeaf]:
    return [
        await world.leaf(world.payer_a, 1),
        await world.leaf(world.payer_a, 2, 10, 20),
        await world.leaf(world.payer_b, 1, 7, 3),
        await world.leaf(world.payer_b, 2),
        await world.leaf(world.payer_a, 1, 1, 1, signer_key=world.dapp_signer.key),
    ]


def expected_slash(charge: int, slashable: int = NODE_STAKE) -> int:
    return min(slashable, max(CONFIG.min_slash, charge * CONFIG.slash_bps // 10_000))


async def assert_voided(world: World, batch_id: int, batch: Batch, receipt, reason: int) -> None:
    s, node = world.c.settlement, world.node.address
    event = s.events(receipt, "BatchVoided")[0]
    assert event["reason"] == reason and event["challenger"] == world.challenger.address
    assert event["rewarded"] == world.challenger.address  # it committed to its proof first
    assert (await s.batch_of(batch_id)).status == s.VOIDED
    for payer in (world.payer_a, world.payer_b):
        assert (await world.c.escrow.account_of(payer.address, node)).balance == DEPOSIT  # refunded
        assert await world.c.escrow.collected_of(payer.address, node) == 0  # cap capacity back
    assert await world.c.escrow.total_collected() == 0
    assert await s.pending_charges_of(node) == 0
    slashed = expected_slash(batch.charge)
    assert event["slashed"] == slashed
    assert (await world.c.nodes.node_of(node)).stake == NODE_STAKE - slashed
    reward = slashed * CONFIG.challenger_reward_bps // 10_000
    assert event["reward"] == reward
    assert await s.claimable_of(world.challenger.address) == reward
    assert await s.claimable_of(world.deployer.address) == slashed - reward
    assert await world.c.token.balance_of(s.address) == slashed
    await s.claim(world.challenger)  # the reward is pullable
    with reverts("UsageSettlementNotPending"):  # a voided batch can be neither challenged nor finalized
        await s.finalize_batch(world.stranger, batch_id, batch.totals())


async def assert_unchallengeable(world: World, batch_id: int, batch: Batch, others: list[tuple[int, Batch]]) -> None:
    """Every proof at every slot, boundary, node and entry of `batch` reverts, with the reason it is honest."""
    s, ch = world.c.settlement, world.challenger
    width = 1 << batch.depth
    for tree in Tree:
        for index in range(width):
            if index < batch.count:
                with reverts("UsageSettlementRecordValid"):
                    await s.prove_invalid_record(ch, batch_id, batch, tree, index)
                with reverts("UsageSettlementRecordPresent"):
                    await s.prove_missing_record(ch, batch_id, batch, tree, index)
            with reverts("UsageSettlementSumCorrect"):
                await s.prove_leaf_sum_mismatch(ch, batch_id, batch, tree, index)
        for index in range(width - 1):
            with reverts("UsageSettlementOrderCorrect"):
                await s.prove_misorder(ch, batch_id, batch, tree, index)
        for level in range(1, batch.depth + 1):
            for index in range(1 << (batch.depth - level)):
                with reverts("UsageSettlementSumCorrect"):
                    await s.prove_node_sum_mismatch(ch, batch_id, batch, tree, level, index)
    for entry in range(len(batch.payer_totals)):
        with reverts("UsageSettlementTotalCorrect"):
            await s.prove_total_mismatch(ch, batch_id, batch, Tree.PAYER, entry)
    for entry in range(len(batch.adapter_totals)):
        with reverts("UsageSettlementTotalCorrect"):
            await s.prove_total_mismatch(ch, batch_id, batch, Tree.ADAPTER, entry)
    for other_id, other in [(batch_id, batch), *others]:
        for index in range(batch.count):
            for other_index in range(other.count):
                if other_id == batch_id and other_index == index:
                    with reverts("UsageSettlementSameLeaf"):
                        await s.prove_duplicate(ch, batch_id, batch, index, other_id, other, other_index)
                    continue
                with reverts("UsageSettlementNoOverlap"):
                    await s.prove_duplicate(ch, batch_id, batch, index, other_id, other, other_index)
    assert (await s.batch_of(batch_id)).status == s.PENDING


async def test_honest_batch_cannot_be_challenged(world: World) -> None:
    leaves = await honest_leaves(world)
    batch = build_batch(leaves)
    batch_id = await world.commit(batch)
    other = build_batch([await world.leaf(world.payer_a), await world.leaf(world.payer_b, 0)])
    other_id = await world.commit(other)
    await assert_unchallengeable(world, batch_id, batch, [(other_id, other)])
    await assert_unchallengeable(world, other_id, other, [(batch_id, batch)])


def high_s(signature: Signature) -> Signature:
    s = SECP256K1_N - int.from_bytes(signature.s, "big")
    return Signature(v=55 - signature.v, r=signature.r, s=s.to_bytes(32, "big"))


async def _bad_leaf(world: World, kind: str) -> tuple[BatchLeaf, int]:
    a = world.payer_a
    now = await world.chain.timestamp()
    match kind:
        case "wrong node":
            return await world.leaf(a, node=world.stranger.address), WRONG_NODE
        case "record mismatch":
            return await world.leaf(a, request_digest=b"\x11" * 32), RECORD_MISMATCH
        case "not the payer's signature":
            return await world.leaf(a, signer_key=world.stranger.key), BAD_SIGNATURE
        case "high-s signature":
            leaf = await world.leaf(a)
            return replace(leaf, signature=high_s(leaf.signature)), BAD_SIGNATURE
        case "garbage signature":
            leaf = await world.leaf(a)
            return replace(leaf, signature=Signature(27, bytes(32), bytes(32))), BAD_SIGNATURE
        case "served after deadline":
            return await world.leaf(a, deadline=now - 5), OUTSIDE_DEADLINE
        case "deadline beyond ttl":
            return await world.leaf(a, deadline=now + CONFIG.max_request_ttl + 10), OUTSIDE_DEADLINE
        case "served in the future":
            return await world.leaf(a, served_at=now + 100), OUTSIDE_DEADLINE
        case "committed after deadline + maxCommitDelay":
            served = now - CONFIG.max_commit_delay - 20
            return await world.leaf(a, served_at=served, deadline=served + 10), OUTSIDE_DEADLINE
        case "charge above cap":
            return await world.leaf(a, max_charge=1), OVER_CAP
        case "tokens above cap":
            return await world.leaf(a, 1, 10, 300, max_tokens=299), OVER_CAP
        case "zero maxCharge":
            return await world.leaf(a, max_charge=0, charge=0, adapter_amount=0), OVER_CAP
        case "interval below zero":
            return await world.leaf(a, cumulative_cap=1), OVER_CAP
        case "charge not price x tokens":
            leaf = await world.leaf(a)
            return await world.leaf(a, charge=leaf.record.charge + 1), WRONG_PRICE
        case "adapter amount off":
            leaf = await world.leaf(a)
            r = leaf.record
            return await world.leaf(a, adapter_amount=r.adapter_amount + 1, charge=r.charge + 1), WRONG_PRICE
        case "input tokens above the signed count":
            billed = price(*PRICES[1], NODE_FEE, 219, 50)  # priced as 219 input tokens, the payer signed 100
            return await world.leaf(a, 1, 100, 50, adapter_amount=billed[0], charge=billed[1]), WRONG_PRICE
        case "wrong terms version":
            return await world.leaf(a, version=1), WRONG_PRICE
        case "unknown adapter":
            return await world.leaf(a, 9, prices=(1, 1)), WRONG_PRICE
        case "wrong node fee":
            return await world.leaf(a, fee=1), WRONG_PRICE
        case "base model charged above the node fee":
            return await world.leaf(a, 0, charge=150 * 10**9 + 5), WRONG_PRICE
        case "base model with a terms version":
            return await world.leaf(a, 0, version=1), WRONG_PRICE
    raise AssertionError(kind)


KINDS = [
    "wrong node", "record mismatch", "not the payer's signature", "high-s signature", "garbage signature",
    "served after deadline", "deadline beyond ttl", "served in the future",
    "committed after deadline + maxCommitDelay", "charge above cap", "tokens above cap", "zero maxCharge",
    "interval below zero", "charge not price x tokens", "adapter amount off", "input tokens above the signed count",
    "wrong terms version", "unknown adapter", "wrong node fee", "base model charged above the node fee",
    "base model with a terms version",
]


@pytest.mark.parametrize("kind", KINDS)
async def test_invalid_record_is_proven(world: World, kind: str) -> None:
    bad, reason = await _bad_leaf(world, kind)
    # The honest leaves come after, so the payers' vouchers are valid requests with higher caps.
    batch = build_batch([*(await honest_leaves(world))[:4], bad])
    batch_id = await world.commit(batch)
    index = batch.index_of(Tree.ADAPTER, bad)
    receipt = await world.c.settlement.prove_invalid_record(world.challenger, batch_id, batch, Tree.ADAPTER, index)
    await assert_voided(world, batch_id, batch, receipt, reason)


async def test_leaf_and_node_sum_mismatch(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.PAYER)
    honest = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER))
    leaf0 = honest.payer_tree.node(0, 0)
    # Leaf 0 carries one wei less than its charge; totals follow the tree, so commit accepts it.
    lying = SumNode(leaf0.hash, leaf0.sum - 1)
    batch = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER), payer_tamper={(0, 0): lying},
                           payer_totals=[(p, a - (1 if i == 0 else 0)) for i, (p, a) in enumerate(honest.payer_totals)])
    batch_id = await world.commit(batch)
    receipt = await world.c.settlement.prove_leaf_sum_mismatch(world.challenger, batch_id, batch, Tree.PAYER, 0)
    await assert_voided(world, batch_id, batch, receipt, SUM_MISMATCH)


async def test_internal_node_sum_mismatch(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.ADAPTER)
    honest = assemble_batch(sorted_leaves(leaves, Tree.PAYER), leaves)
    node = honest.adapter_tree.node(1, 0)
    cut = 10**12
    batch = assemble_batch(
        sorted_leaves(leaves, Tree.PAYER), leaves, adapter_tamper={(1, 0): SumNode(node.hash, node.sum - cut)},
        adapter_totals=[(a, v, amt - (cut if i == 0 else 0)) for i, (a, v, amt) in enumerate(honest.adapter_totals)])
    batch_id = await world.commit(batch)
    s = world.c.settlement
    for level, index in ((1, 1), (2, 0), (3, 0)):  # above and beside the lie every node adds up
        with reverts("UsageSettlementSumCorrect"):
            await s.prove_node_sum_mismatch(world.challenger, batch_id, batch, Tree.ADAPTER, level, index)
    receipt = await s.prove_node_sum_mismatch(world.challenger, batch_id, batch, Tree.ADAPTER, 1, 0)
    await assert_voided(world, batch_id, batch, receipt, SUM_MISMATCH)


async def test_empty_slot_with_a_sum(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.PAYER)
    honest = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER))
    extra = 5
    payers = list(honest.payer_totals)
    payers[0] = (payers[0][0], payers[0][1] + extra)
    batch = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER), payer_tamper={(0, 6): SumNode(bytes(32), extra)},
                           payer_totals=payers)
    batch_id = await world.commit(batch)
    receipt = await world.c.settlement.prove_leaf_sum_mismatch(world.challenger, batch_id, batch, Tree.PAYER, 6)
    await assert_voided(world, batch_id, batch, receipt, SUM_MISMATCH)


async def test_misordered_leaves(world: World) -> None:
    leaves = await honest_leaves(world)
    payer_order = sorted_leaves(leaves, Tree.PAYER)
    payer_order[0], payer_order[1] = payer_order[1], payer_order[0]
    batch = assemble_batch(payer_order, sorted_leaves(leaves, Tree.ADAPTER))
    batch_id = await world.commit(batch)
    receipt = await world.c.settlement.prove_misorder(world.challenger, batch_id, batch, Tree.PAYER, 0)
    await assert_voided(world, batch_id, batch, receipt, MISORDERED)


async def test_record_after_an_empty_slot(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.ADAPTER)
    honest = assemble_batch(sorted_leaves(leaves, Tree.PAYER), leaves)
    last = leaves[-1]
    # Slot 4 left empty, the last record moved to slot 5.
    batch = assemble_batch(sorted_leaves(leaves, Tree.PAYER), leaves,
                           adapter_tamper={(0, 4): EMPTY, (0, 5): last.node(Tree.ADAPTER)})
    assert batch.adapter_tree.root.sum == honest.adapter_tree.root.sum
    batch_id = await world.commit(batch)
    first = (4, True, batch.leaf_proof(Tree.ADAPTER, 7)[2], [n.as_tuple() for n in batch.adapter_tree.proof(4)])
    second = (5, False, last.as_abi(), [n.as_tuple() for n in batch.adapter_tree.proof(5)])
    s = world.c.settlement
    receipt = await s.prove(world.challenger, s.contract.functions.proveMisorder(
        batch_id, batch.totals(), int(Tree.ADAPTER), first, second))
    await assert_voided(world, batch_id, batch, receipt, MISORDERED)


async def test_overlapping_intervals_in_one_batch(world: World) -> None:
    """Two records of one payer whose intervals overlap sit next to each other in the payer tree."""
    first = await world.leaf(world.payer_b, 1)
    _, hi = first.request.interval
    width = 2 * price(*PRICES[2], NODE_FEE, 100, 50)[1]
    second = await world.leaf(world.payer_b, 2, cumulative_cap=hi + width, max_charge=width + 1)  # (hi - 1, ...]
    assert second.request.well_formed and second.record.charge <= second.request.max_charge
    batch = build_batch([*(await honest_leaves(world))[:2], first, second])
    batch_id = await world.commit(batch)
    index = batch.index_of(Tree.PAYER, first)
    assert batch.index_of(Tree.PAYER, second) == index + 1
    receipt = await world.c.settlement.prove_misorder(world.challenger, batch_id, batch, Tree.PAYER, index)
    await assert_voided(world, batch_id, batch, receipt, MISORDERED)


@pytest.mark.parametrize("tree", list(Tree))
async def test_total_not_sum_of_range(world: World, tree: Tree) -> None:
    leaves = await honest_leaves(world)
    honest = build_batch(leaves)
    payers, adapters = honest.totals()
    shift = 10**9
    if tree is Tree.PAYER:
        payers = [(payers[0][0], payers[0][1] + shift), (payers[1][0], payers[1][1] - shift)]
    else:
        adapters = [(a, v, amt + (shift if i == 0 else -shift)) for i, (a, v, amt) in enumerate(adapters)]
    batch = assemble_batch(honest.payer_leaves, honest.adapter_leaves, payer_totals=payers, adapter_totals=adapters)
    batch_id = await world.commit(batch)
    receipt = await world.c.settlement.prove_total_mismatch(world.challenger, batch_id, batch, tree, 1)
    await assert_voided(world, batch_id, batch, receipt, TOTAL_MISMATCH)


async def test_total_for_a_payer_without_records(world: World) -> None:
    leaves = [await world.leaf(world.payer_a), await world.leaf(world.payer_a, 2)]
    voucher_b = (await world.leaf(world.payer_b)).voucher  # payer B signed a request, but it is not here
    honest = build_batch(leaves)
    (payer, amount), = honest.payer_totals
    # Payer B has no record but is charged one wei taken off payer A.
    payers = sorted([(payer, amount - 1), (world.payer_b.address, 1)], key=lambda e: int(e[0], 16))
    batch = assemble_batch(honest.payer_leaves, honest.adapter_leaves, payer_totals=payers,
                           vouchers={world.payer_b.address: voucher_b})
    batch_id = await world.commit(batch)
    entry = next(i for i, (p, _) in enumerate(payers) if p == world.payer_b.address)
    receipt = await world.c.settlement.prove_total_mismatch(world.challenger, batch_id, batch, Tree.PAYER, entry)
    await assert_voided(world, batch_id, batch, receipt, TOTAL_MISMATCH)


@pytest.mark.parametrize("source", list(Tree))
async def test_record_missing_from_the_other_tree(world: World, source: Tree) -> None:
    leaves = await honest_leaves(world)
    target = leaves[2]
    # Same payer, adapter and amounts as `target`, another interval and prompt: the sums of both trees agree.
    swapped = await world.leaf(world.payer_b, 1, 7, 3)
    others = [swapped if leaf is target else leaf for leaf in leaves]
    if source is Tree.PAYER:
        batch = assemble_batch(sorted_leaves(leaves, Tree.PAYER), sorted_leaves(others, Tree.ADAPTER))
    else:
        batch = assemble_batch(sorted_leaves(others, Tree.PAYER), sorted_leaves(leaves, Tree.ADAPTER),
                               payer_totals=build_batch(leaves).payer_totals)
    batch_id = await world.commit(batch)
    index = batch.index_of(source, target)
    receipt = await world.c.settlement.prove_missing_record(world.challenger, batch_id, batch, source, index)
    await assert_voided(world, batch_id, batch, receipt, MISSING_RECORD)


async def test_record_missing_with_same_key_other_contents(world: World) -> None:
    leaves = await honest_leaves(world)
    target = leaves[0]
    twin = await world.leaf(world.payer_a, 1, cumulative_cap=target.request.cumulative_cap,
                            max_charge=target.request.max_charge)  # same key, other prompt
    others = [twin if leaf is target else leaf for leaf in leaves]
    batch = assemble_batch(sorted_leaves(leaves, Tree.PAYER), sorted_leaves(others, Tree.ADAPTER))
    batch_id = await world.commit(batch)
    receipt = await world.c.settlement.prove_missing_record(
        world.challenger, batch_id, batch, Tree.PAYER, batch.index_of(Tree.PAYER, target))
    await assert_voided(world, batch_id, batch, receipt, MISSING_RECORD)


async def test_interval_charged_twice_across_batches(world: World) -> None:
    s = world.c.settlement
    original = await world.leaf(world.payer_a, 1)
    first = build_batch([original, await world.leaf(world.payer_b)])
    first_id = await world.commit(first)
    await world.chain.increase_time(CONFIG.challenge_window)
    await s.finalize_batch(world.stranger, first_id, first.totals())
    # A second request on an interval that overlaps the first one by one wei.
    lo, hi = original.request.interval
    replay = await world.leaf(world.payer_a, 2, cumulative_cap=lo + 1 + 10**18, max_charge=10**18)
    second = build_batch([replay, await world.leaf(world.payer_a)])
    second_id = await world.commit(second)
    index = second.index_of(Tree.PAYER, replay)
    with reverts("UsageSettlementNotComparable"):
        await s.prove_duplicate(world.challenger, second_id, second, index, 42, first, 0)
    receipt = await s.prove_duplicate(world.challenger, second_id, second, index, first_id, first,
                                      first.index_of(Tree.PAYER, original))
    event = s.events(receipt, "BatchVoided")[0]
    assert event["reason"] == OVERLAP
    assert (await s.batch_of(second_id)).status == s.VOIDED
    assert (await s.batch_of(first_id)).status == s.FINALIZED
    assert await world.c.escrow.collected_of(world.payer_a.address, world.node.address) == dict(first.payer_totals)[
        world.payer_a.address]


async def test_duplicate_needs_the_same_node(world: World) -> None:
    c = world.c
    await c.token.approve(world.stranger, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.stranger, world.stranger.address, "http://other", 10**9, 1_000 * 10**18)
    mine_leaf = await world.leaf(world.payer_a)
    mine = build_batch([mine_leaf])
    mine_id = await world.commit(mine)
    theirs = build_batch([await world.leaf(world.payer_a, node=world.stranger.address,
                                           cumulative_cap=mine_leaf.request.cumulative_cap)])
    theirs_id = await world.commit(theirs, sender=world.stranger, node=world.stranger.address)
    with reverts("UsageSettlementDifferentNodes"):
        await c.settlement.prove_duplicate(world.challenger, theirs_id, theirs, 0, mine_id, mine, 0)


async def test_proof_reverts(world: World) -> None:
    s, ch = world.c.settlement, world.challenger
    leaves = await honest_leaves(world)
    batch = build_batch(leaves)
    batch_id = await world.commit(batch)
    fn = s.contract.functions
    totals = batch.totals()
    proof = batch.leaf_proof(Tree.PAYER, 0)

    async def send(call):
        await s.prove(ch, call)

    with reverts("UsageSettlementTotalsMismatch"):
        await send(fn.proveInvalidRecord(batch_id, (totals[0][:1], totals[1]), 0, proof))
    with reverts("UsageSettlementBadProofLength"):
        await send(fn.proveInvalidRecord(batch_id, totals, 0, (*proof[:3], proof[3][:-1])))
    with reverts("UsageSettlementIndexOutOfRange"):
        await send(fn.proveInvalidRecord(batch_id, totals, 0, (8, *proof[1:])))
    with reverts("UsageSettlementInvalidProof"):
        await send(fn.proveInvalidRecord(batch_id, totals, 0, (1, *proof[1:])))
    with reverts("UsageSettlementEmptyLeaf"):
        await s.prove_invalid_record(ch, batch_id, batch, Tree.PAYER, 6)
    node, siblings = batch.node_proof(Tree.PAYER, 1, 0)
    with reverts("UsageSettlementBadLevel"):
        await send(fn.proveNodeSumMismatch(batch_id, totals, 0, 0, 0, node, siblings, node, node))
    with reverts("UsageSettlementInvalidPreimage"):
        await send(fn.proveNodeSumMismatch(batch_id, totals, 0, 1, 0, node, siblings, node, node))
    with reverts("UsageSettlementNotAdjacent"):
        await send(fn.proveMisorder(batch_id, totals, 0, proof, batch.leaf_proof(Tree.PAYER, 2)))
    lower, upper = batch.total_boundaries(Tree.PAYER, 0)
    with reverts("UsageSettlementBadBoundary"):
        await send(fn.proveTotalMismatch(batch_id, totals, 0, 0, upper, upper))
    with reverts("UsageSettlementBadBoundary"):
        await send(fn.proveTotalMismatch(batch_id, totals, 0, 0, (9, *lower[1:]), upper))
    with reverts("UsageSettlementEntryOutOfRange"):
        await send(fn.proveTotalMismatch(batch_id, totals, 0, 5, lower, upper))
    with reverts("UsageSettlementEmptyLeaf"):
        await send(fn.proveMissingRecord(batch_id, totals, 0, batch.leaf_proof(Tree.PAYER, 7),
                                         batch.boundary(Tree.ADAPTER, 0)))
    with reverts("UsageSettlementBadBoundary"):
        await send(fn.proveMissingRecord(batch_id, totals, 0, proof, batch.boundary(Tree.ADAPTER, 5)))
    with reverts("UsageSettlementEmptyLeaf"):
        await send(fn.proveDuplicate(batch_id, totals, batch.leaf_proof(Tree.PAYER, 7), batch_id, proof))
    await world.chain.increase_time(CONFIG.challenge_window)
    with reverts("UsageSettlementChallengeWindowClosed"):
        await s.prove_invalid_record(ch, batch_id, batch, Tree.PAYER, 0)


def _random_honest(anvil, fresh_chain, examples: int) -> None:
    """Random honest batches (1-7 records of two payers, one through its dApp signer, adapters 0-2, any
    token counts): every proof at every slot, boundary, node and entry reverts, also against the batch
    committed before it."""
    spec = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 5_000), st.integers(0, 5_000)),
                    min_size=1, max_size=7)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(first=spec, second=spec)
    def check(first, second) -> None:
        with asyncio.Runner() as runner:
            chain = runner.run(Chain.connect(anvil.rpc_url))
            world = World(chain, fresh_chain, Contracts.attach(chain, fresh_chain), anvil.private_keys)
            snapshot = runner.run(chain.snapshot())
            try:
                batches = []
                for records in (first, second):
                    leaves = []
                    for who, adapter, tokens_in, tokens_out in records:
                        payer = world.payer_b if who == 2 else world.payer_a
                        key = world.dapp_signer.key if who == 1 else None
                        leaves.append(runner.run(world.leaf(payer, adapter, tokens_in, tokens_out, signer_key=key)))
                    batch = build_batch(leaves)
                    batches.append((runner.run(world.commit(batch)), batch))
                (first_id, first_batch), (second_id, second_batch) = batches
                runner.run(assert_unchallengeable(world, second_id, second_batch, [(first_id, first_batch)]))
            finally:
                runner.run(chain.revert(snapshot))
                runner.run(chain.close())

    check()


def test_random_honest_batches_cannot_be_challenged(anvil, fresh_chain) -> None:
    _random_honest(anvil, fresh_chain, examples=4)


@pytest.mark.slow
def test_random_honest_batches_cannot_be_challenged_long(anvil, fresh_chain) -> None:
    _random_honest(anvil, fresh_chain, examples=15)
