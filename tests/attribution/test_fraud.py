"""Fraud proofs: an honest batch cannot be challenged; each cheat is proven, voids the batch, refunds
its payers, slashes the node and rewards the challenger."""

from __future__ import annotations

from dataclasses import replace

import pytest

from attribution.batch import Batch, BatchLeaf, Tree, assemble_batch, build_batch, sorted_leaves
from attribution.eip712 import SECP256K1_N, Signature
from attribution.merkle import EMPTY, SumNode
from tests.attribution.helpers import CONFIG, DEPOSIT, NODE_STAKE, World, reverts

CID = "bafkreifraud"
WRONG_NODE, RECORD_MISMATCH, BAD_SIGNATURE, OUTSIDE_DEADLINE, OVER_CAP, WRONG_PRICE = 1, 2, 3, 4, 5, 6
SUM_MISMATCH, MISORDERED, TOTAL_MISMATCH, MISSING_RECORD, DUPLICATE_NONCE = 7, 8, 9, 10, 11


async def commit(world: World, batch: Batch) -> int:
    batch_id, _ = await world.c.settlement.commit_batch(world.node_signer, world.node.address, batch, CID)
    return batch_id


async def honest_leaves(world: World) -> list[BatchLeaf]:
    return [
        await world.leaf(world.payer_a, 1),
        await world.leaf(world.payer_a, 2, 10, 20),
        await world.leaf(world.payer_b, 1, 7, 3),
        await world.leaf(world.payer_b, 2),
        await world.leaf(world.payer_a, 1, 1, 1, signer_key=world.dapp_signer.key),
    ]


async def assert_voided(world: World, batch_id: int, receipt, reason: int, totals) -> None:
    s = world.c.settlement
    event = s.events(receipt, "BatchVoided")[0]
    assert event["reason"] == reason and event["challenger"] == world.challenger.address
    assert (await s.batch_of(batch_id)).status == s.VOIDED
    for payer in (world.payer_a, world.payer_b):
        assert (await world.c.escrow.account_of(payer.address)).balance == DEPOSIT  # refunded
    assert await world.c.escrow.total_locked() == 0
    slashed = NODE_STAKE * CONFIG.slash_bps // 10_000
    assert event["slashed"] == slashed
    assert (await world.c.nodes.node_of(world.node.address)).stake == NODE_STAKE - slashed
    reward = slashed * CONFIG.challenger_reward_bps // 10_000
    assert await s.claimable_of(world.challenger.address) == reward
    assert await s.claimable_of(world.deployer.address) == slashed - reward
    assert await world.c.token.balance_of(s.address) == slashed
    await s.claim(world.challenger)  # the reward is pullable
    # A voided batch can be neither challenged again nor finalized.
    with reverts("UsageSettlementNotPending"):
        await s.finalize_batch(world.stranger, batch_id, totals)


async def test_honest_batch_cannot_be_challenged(world: World) -> None:
    s, ch = world.c.settlement, world.challenger
    leaves = await honest_leaves(world)
    batch = build_batch(leaves)
    batch_id = await commit(world, batch)
    other = build_batch([await world.leaf(world.payer_a)])
    other_id = await commit(world, other)
    for tree in Tree:
        for index in range(len(leaves)):
            with reverts("UsageSettlementRecordValid"):
                await s.prove_invalid_record(ch, batch_id, batch, tree, index)
            with reverts("UsageSettlementSumCorrect"):
                await s.prove_leaf_sum_mismatch(ch, batch_id, batch, tree, index)
            with reverts("UsageSettlementRecordPresent"):
                await s.prove_missing_record(ch, batch_id, batch, tree, index)
        with reverts("UsageSettlementSumCorrect"):  # an empty slot carries no sum
            await s.prove_leaf_sum_mismatch(ch, batch_id, batch, tree, 7)
        for index in range(7):
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
    with reverts("UsageSettlementNotDuplicate"):
        await s.prove_duplicate(ch, other_id, other, 0, batch_id, batch, 0)
    with reverts("UsageSettlementSameLeaf"):
        await s.prove_duplicate(ch, batch_id, batch, 1, batch_id, batch, 1)
    assert (await s.batch_of(batch_id)).status == s.PENDING


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
        case "charge above cap":
            return await world.leaf(a, max_charge=1), OVER_CAP
        case "tokens above cap":
            return await world.leaf(a, 1, 10, 300, max_tokens=299), OVER_CAP
        case "charge not price x tokens":
            leaf = await world.leaf(a)
            return await world.leaf(a, charge=leaf.record.charge + 1), WRONG_PRICE
        case "adapter amount off":
            leaf = await world.leaf(a)
            r = leaf.record
            return await world.leaf(a, adapter_amount=r.adapter_amount + 1, charge=r.charge + 1), WRONG_PRICE
        case "wrong terms version":
            return await world.leaf(a, version=1), WRONG_PRICE
        case "unknown adapter":
            return await world.leaf(a, 9, prices=(1, 1)), WRONG_PRICE
        case "wrong node fee":
            return await world.leaf(a, fee=1), WRONG_PRICE
    raise AssertionError(kind)


KINDS = [
    "wrong node", "record mismatch", "not the payer's signature", "high-s signature", "garbage signature",
    "served after deadline", "deadline beyond ttl", "served in the future", "charge above cap",
    "tokens above cap", "charge not price x tokens", "adapter amount off", "wrong terms version",
    "unknown adapter", "wrong node fee",
]


@pytest.mark.parametrize("kind", KINDS)
async def test_invalid_record_is_proven(world: World, kind: str) -> None:
    bad, reason = await _bad_leaf(world, kind)
    batch = build_batch([*(await honest_leaves(world))[:3], bad])
    batch_id = await commit(world, batch)
    index = batch.index_of(Tree.ADAPTER, bad)
    receipt = await world.c.settlement.prove_invalid_record(world.challenger, batch_id, batch, Tree.ADAPTER, index)
    await assert_voided(world, batch_id, receipt, reason, batch.totals())


async def test_revoked_signer_and_retired_adapter(world: World) -> None:
    c = world.c
    await c.escrow.revoke_signer(world.payer_a, world.dapp_signer.address)
    await c.adapters.retire(world.owner, 2)
    before = await world.leaf(world.payer_a, 2, signer_key=world.dapp_signer.key)
    assert await c.settlement.check_leaf(world.node.address, 2**40, before.as_abi()) == 0
    await world.chain.increase_time(CONFIG.notice_period + 1)
    revoked = await world.leaf(world.payer_a, signer_key=world.dapp_signer.key)
    assert await c.settlement.check_leaf(world.node.address, 2**40, revoked.as_abi()) == BAD_SIGNATURE
    retired = await world.leaf(world.payer_a, 2, version=1)
    assert await c.settlement.check_leaf(world.node.address, 2**40, retired.as_abi()) == WRONG_PRICE
    batch = build_batch([before, revoked])
    batch_id = await commit(world, batch)
    receipt = await c.settlement.prove_invalid_record(
        world.challenger, batch_id, batch, Tree.PAYER, batch.index_of(Tree.PAYER, revoked))
    await assert_voided(world, batch_id, receipt, BAD_SIGNATURE, batch.totals())


async def test_leaf_and_node_sum_mismatch(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.PAYER)
    honest = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER))
    leaf0 = honest.payer_tree.node(0, 0)
    # Leaf 0 carries one wei less than its charge; totals follow the tree, so commit accepts it.
    lying = SumNode(leaf0.hash, leaf0.sum - 1)
    batch = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER), payer_tamper={(0, 0): lying},
                           payer_totals=[(p, a - (1 if i == 0 else 0)) for i, (p, a) in enumerate(honest.payer_totals)])
    batch_id = await commit(world, batch)
    receipt = await world.c.settlement.prove_leaf_sum_mismatch(world.challenger, batch_id, batch, Tree.PAYER, 0)
    await assert_voided(world, batch_id, receipt, SUM_MISMATCH, batch.totals())


async def test_internal_node_sum_mismatch(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.ADAPTER)
    honest = assemble_batch(sorted_leaves(leaves, Tree.PAYER), leaves)
    node = honest.adapter_tree.node(1, 0)
    cut = 10**12
    batch = assemble_batch(
        sorted_leaves(leaves, Tree.PAYER), leaves, adapter_tamper={(1, 0): SumNode(node.hash, node.sum - cut)},
        adapter_totals=[(a, v, amt - (cut if i == 0 else 0)) for i, (a, v, amt) in enumerate(honest.adapter_totals)])
    batch_id = await commit(world, batch)
    s = world.c.settlement
    for level, index in ((1, 1), (2, 0), (3, 0)):  # above and beside the lie every node adds up
        with reverts("UsageSettlementSumCorrect"):
            await s.prove_node_sum_mismatch(world.challenger, batch_id, batch, Tree.ADAPTER, level, index)
    receipt = await s.prove_node_sum_mismatch(world.challenger, batch_id, batch, Tree.ADAPTER, 1, 0)
    await assert_voided(world, batch_id, receipt, SUM_MISMATCH, batch.totals())


async def test_empty_slot_with_a_sum(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.PAYER)
    honest = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER))
    extra = 5
    payers = list(honest.payer_totals)
    payers[0] = (payers[0][0], payers[0][1] + extra)
    batch = assemble_batch(leaves, sorted_leaves(leaves, Tree.ADAPTER), payer_tamper={(0, 6): SumNode(bytes(32), extra)},
                           payer_totals=payers)
    batch_id = await commit(world, batch)
    receipt = await world.c.settlement.prove_leaf_sum_mismatch(world.challenger, batch_id, batch, Tree.PAYER, 6)
    await assert_voided(world, batch_id, receipt, SUM_MISMATCH, batch.totals())


async def test_misordered_leaves(world: World) -> None:
    leaves = await honest_leaves(world)
    payer_order = sorted_leaves(leaves, Tree.PAYER)
    payer_order[0], payer_order[1] = payer_order[1], payer_order[0]
    batch = assemble_batch(payer_order, sorted_leaves(leaves, Tree.ADAPTER))
    batch_id = await commit(world, batch)
    receipt = await world.c.settlement.prove_misorder(world.challenger, batch_id, batch, Tree.PAYER, 0)
    await assert_voided(world, batch_id, receipt, MISORDERED, batch.totals())


async def test_record_after_an_empty_slot(world: World) -> None:
    leaves = sorted_leaves(await honest_leaves(world), Tree.ADAPTER)
    honest = assemble_batch(sorted_leaves(leaves, Tree.PAYER), leaves)
    last = leaves[-1]
    # Slot 4 left empty, the last record moved to slot 5.
    batch = assemble_batch(sorted_leaves(leaves, Tree.PAYER), leaves,
                           adapter_tamper={(0, 4): EMPTY, (0, 5): last.node(Tree.ADAPTER)})
    assert batch.adapter_tree.root.sum == honest.adapter_tree.root.sum
    batch_id = await commit(world, batch)
    first = (4, True, batch.leaf_proof(Tree.ADAPTER, 7)[2], [n.as_tuple() for n in batch.adapter_tree.proof(4)])
    second = (5, False, last.as_abi(), [n.as_tuple() for n in batch.adapter_tree.proof(5)])
    receipt = await world.chain.transact(world.challenger, world.c.settlement.contract.functions.proveMisorder(
        batch_id, batch.totals(), int(Tree.ADAPTER), first, second))
    await assert_voided(world, batch_id, receipt, MISORDERED, batch.totals())


async def test_nonce_twice_in_one_batch(world: World) -> None:
    first = await world.leaf(world.payer_b, 1, nonce=42)
    second = await world.leaf(world.payer_b, 2, nonce=42)
    batch = build_batch([*(await honest_leaves(world))[:2], first, second])
    batch_id = await commit(world, batch)
    index = min(batch.index_of(Tree.PAYER, first), batch.index_of(Tree.PAYER, second))
    receipt = await world.c.settlement.prove_misorder(world.challenger, batch_id, batch, Tree.PAYER, index)
    await assert_voided(world, batch_id, receipt, MISORDERED, batch.totals())


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
    batch_id = await commit(world, batch)
    receipt = await world.c.settlement.prove_total_mismatch(world.challenger, batch_id, batch, tree, 1)
    await assert_voided(world, batch_id, receipt, TOTAL_MISMATCH, batch.totals())


async def test_total_for_a_payer_without_records(world: World) -> None:
    leaves = [await world.leaf(world.payer_a), await world.leaf(world.payer_a, 2)]
    honest = build_batch(leaves)
    (payer, amount), = honest.payer_totals
    # Payer B has no record but is charged one wei taken off payer A.
    payers = sorted([(payer, amount - 1), (world.payer_b.address, 1)], key=lambda e: int(e[0], 16))
    batch = assemble_batch(honest.payer_leaves, honest.adapter_leaves, payer_totals=payers)
    batch_id = await commit(world, batch)
    entry = next(i for i, (p, _) in enumerate(payers) if p == world.payer_b.address)
    receipt = await world.c.settlement.prove_total_mismatch(world.challenger, batch_id, batch, Tree.PAYER, entry)
    await assert_voided(world, batch_id, receipt, TOTAL_MISMATCH, batch.totals())


@pytest.mark.parametrize("source", list(Tree))
async def test_record_missing_from_the_other_tree(world: World, source: Tree) -> None:
    leaves = await honest_leaves(world)
    swapped = await world.leaf(world.payer_b, 1, 7, 3)
    target = leaves[2]  # same amounts as `swapped`: the sums of both trees still agree
    others = [swapped if leaf is target else leaf for leaf in leaves]
    if source is Tree.PAYER:
        batch = assemble_batch(sorted_leaves(leaves, Tree.PAYER), sorted_leaves(others, Tree.ADAPTER))
    else:
        batch = assemble_batch(sorted_leaves(others, Tree.PAYER), sorted_leaves(leaves, Tree.ADAPTER),
                               payer_totals=build_batch(leaves).payer_totals)
    batch_id = await commit(world, batch)
    index = batch.index_of(source, target)
    receipt = await world.c.settlement.prove_missing_record(world.challenger, batch_id, batch, source, index)
    await assert_voided(world, batch_id, receipt, MISSING_RECORD, batch.totals())


async def test_record_missing_with_same_key_other_contents(world: World) -> None:
    leaves = await honest_leaves(world)
    target = leaves[0]
    twin = await world.leaf(world.payer_a, 1, nonce=target.request.nonce)  # same key, other prompt
    others = [twin if leaf is target else leaf for leaf in leaves]
    batch = assemble_batch(sorted_leaves(leaves, Tree.PAYER), sorted_leaves(others, Tree.ADAPTER))
    batch_id = await commit(world, batch)
    receipt = await world.c.settlement.prove_missing_record(
        world.challenger, batch_id, batch, Tree.PAYER, batch.index_of(Tree.PAYER, target))
    await assert_voided(world, batch_id, receipt, MISSING_RECORD, batch.totals())


async def test_duplicate_nonce_across_batches(world: World) -> None:
    s = world.c.settlement
    original = await world.leaf(world.payer_a, 1, nonce=7)
    first = build_batch([original, await world.leaf(world.payer_b)])
    first_id = await commit(world, first)
    await world.chain.increase_time(CONFIG.challenge_window)
    await s.finalize_batch(world.stranger, first_id, first.totals())
    replay = await world.leaf(world.payer_a, 2, nonce=7)
    second = build_batch([replay])
    second_id = await commit(world, second)
    with reverts("UsageSettlementNotComparable"):
        await s.prove_duplicate(world.challenger, second_id, second, 0, 42, first, 0)
    receipt = await s.prove_duplicate(world.challenger, second_id, second, 0, first_id, first,
                                      first.index_of(Tree.PAYER, original))
    event = s.events(receipt, "BatchVoided")[0]
    assert event["reason"] == DUPLICATE_NONCE
    assert (await s.batch_of(second_id)).status == s.VOIDED
    assert (await s.batch_of(first_id)).status == s.FINALIZED


async def test_duplicate_needs_the_same_node(world: World) -> None:
    c = world.c
    await c.token.approve(world.stranger, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.stranger, world.stranger.address, "http://other", 10**9, 1_000 * 10**18)
    mine = build_batch([await world.leaf(world.payer_a, nonce=9)])
    mine_id = await commit(world, mine)
    theirs = build_batch([await world.leaf(world.payer_a, nonce=9, node=world.stranger.address)])
    theirs_id, _ = await c.settlement.commit_batch(world.stranger, world.stranger.address, theirs, CID)
    with reverts("UsageSettlementDifferentNodes"):
        await c.settlement.prove_duplicate(world.challenger, theirs_id, theirs, 0, mine_id, mine, 0)


async def test_proof_reverts(world: World) -> None:
    s, ch = world.c.settlement, world.challenger
    leaves = await honest_leaves(world)
    batch = build_batch(leaves)
    batch_id = await commit(world, batch)
    fn = s.contract.functions
    totals = batch.totals()
    proof = batch.leaf_proof(Tree.PAYER, 0)
    with reverts("UsageSettlementTotalsMismatch"):
        await world.chain.transact(ch, fn.proveInvalidRecord(batch_id, (totals[0][:1], totals[1]), 0, proof))
    with reverts("UsageSettlementBadProofLength"):
        await world.chain.transact(ch, fn.proveInvalidRecord(batch_id, totals, 0, (*proof[:3], proof[3][:-1])))
    with reverts("UsageSettlementIndexOutOfRange"):
        await world.chain.transact(ch, fn.proveInvalidRecord(batch_id, totals, 0, (8, *proof[1:])))
    with reverts("UsageSettlementInvalidProof"):
        await world.chain.transact(ch, fn.proveInvalidRecord(batch_id, totals, 0, (1, *proof[1:])))
    with reverts("UsageSettlementEmptyLeaf"):
        await s.prove_invalid_record(ch, batch_id, batch, Tree.PAYER, 6)
    node, siblings = batch.node_proof(Tree.PAYER, 1, 0)
    with reverts("UsageSettlementBadLevel"):
        await world.chain.transact(ch, fn.proveNodeSumMismatch(batch_id, totals, 0, 0, 0, node, siblings, node, node))
    with reverts("UsageSettlementInvalidPreimage"):
        await world.chain.transact(ch, fn.proveNodeSumMismatch(batch_id, totals, 0, 1, 0, node, siblings, node, node))
    with reverts("UsageSettlementNotAdjacent"):
        await world.chain.transact(ch, fn.proveMisorder(batch_id, totals, 0, proof, batch.leaf_proof(Tree.PAYER, 2)))
    lower, upper = batch.total_boundaries(Tree.PAYER, 0)
    with reverts("UsageSettlementBadBoundary"):
        await world.chain.transact(ch, fn.proveTotalMismatch(batch_id, totals, 0, 0, upper, upper))
    with reverts("UsageSettlementBadBoundary"):
        await world.chain.transact(ch, fn.proveTotalMismatch(batch_id, totals, 0, 0, (9, *lower[1:]), upper))
    with reverts("UsageSettlementEntryOutOfRange"):
        await world.chain.transact(ch, fn.proveTotalMismatch(batch_id, totals, 0, 5, lower, upper))
    with reverts("UsageSettlementEmptyLeaf"):
        await world.chain.transact(ch, fn.proveMissingRecord(batch_id, totals, 0, batch.leaf_proof(Tree.PAYER, 7),
                                                             batch.boundary(Tree.ADAPTER, 0)))
    with reverts("UsageSettlementBadBoundary"):
        await world.chain.transact(ch, fn.proveMissingRecord(batch_id, totals, 0, proof, batch.boundary(Tree.ADAPTER, 5)))
    with reverts("UsageSettlementEmptyLeaf"):
        await world.chain.transact(ch, fn.proveDuplicate(batch_id, totals, batch.leaf_proof(Tree.PAYER, 7), batch_id, proof))
    await world.chain.increase_time(CONFIG.challenge_window)
    with reverts("UsageSettlementChallengeWindowClosed"):
        await s.prove_invalid_record(ch, batch_id, batch, Tree.PAYER, 0)
