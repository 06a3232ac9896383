"""UsageSettlement: commit, finalize, distribute, claim (happy paths and every revert)."""

from __future__ import annotations

from dataclasses import replace

from attribution.batch import Tree, build_batch, honest_totals
from tests.attribution.helpers import CONFIG, DEPOSIT, World, reverts

CID = "bafkreitestbatch"


async def _committed(world: World, leaves_spec=((3, 1), (3, 2), (4, 1))):
    payers = {3: world.payer_a, 4: world.payer_b}
    leaves = [await world.leaf(payers[p], adapter) for p, adapter in leaves_spec]
    batch = build_batch(leaves)
    batch_id, receipt = await world.c.settlement.commit_batch(world.node_signer, world.node.address, batch, CID)
    return batch, batch_id, receipt


async def test_commit_locks_payer_funds_and_records_header(world: World) -> None:
    batch, batch_id, receipt = await _committed(world)
    s = world.c.settlement
    assert batch_id == 1 and await s.batch_count() == 1
    header = await s.batch_of(batch_id)
    assert header.status == s.PENDING and header.node == world.node.address
    assert header.payer_root == batch.payer_tree.root.hash and header.payer_sum == batch.payer_tree.root.sum
    assert header.adapter_root == batch.adapter_tree.root.hash and header.depth == 2
    event = s.events(receipt, "BatchCommitted")[0]
    assert event["cid"] == CID and event["count"] == 3
    charged = dict(batch.payer_totals)
    account = await world.c.escrow.account_of(world.payer_a.address)
    assert account.balance == DEPOSIT - charged[world.payer_a.address]
    assert await world.c.escrow.total_locked() == batch.payer_tree.root.sum


async def test_commit_by_node_operator_itself(world: World) -> None:
    leaf = await world.leaf(world.payer_a)
    batch_id, _ = await world.c.settlement.commit_batch(world.node, world.node.address, build_batch([leaf]), CID)
    assert (await world.c.settlement.batch_of(batch_id)).depth == 0


async def test_commit_reverts(world: World) -> None:
    s, node = world.c.settlement, world.node.address
    batch = build_batch([await world.leaf(world.payer_a), await world.leaf(world.payer_b, 2)])
    with reverts("UsageSettlementNotNodeOrSigner"):
        await s.commit_batch(world.stranger, node, batch, CID)
    with reverts("UsageSettlementNodeInactive"):
        await s.commit_batch(world.stranger, world.stranger.address, batch, CID)
    fn = s.contract.functions.commitBatch
    commitment = list(batch.commitment(CID))
    bad_shape = commitment.copy()
    bad_shape[5] = 5  # count 5 does not fit depth 1
    with reverts("UsageSettlementBadShape"):
        await world.chain.transact(world.node, fn(node, tuple(bad_shape), batch.totals()))
    with reverts("UsageSettlementEmptyBatch"):
        await world.chain.transact(world.node, fn(node, tuple(commitment), ([], batch.totals()[1])))
    payers, adapters = batch.totals()
    with reverts("UsageSettlementPayersNotSorted"):
        await world.chain.transact(world.node, fn(node, tuple(commitment), (payers[::-1], adapters)))
    with reverts("UsageSettlementAdaptersNotSorted"):
        await world.chain.transact(world.node, fn(node, tuple(commitment), (payers, adapters[::-1])))
    with reverts("UsageSettlementSumMismatch"):
        await world.chain.transact(world.node, fn(node, tuple(commitment), ([(payers[0][0], 1), payers[1]], adapters)))
    with reverts("UsageSettlementSumMismatch"):
        await world.chain.transact(world.node, fn(node, tuple(commitment), (payers, [adapters[0]])))
    too_high = commitment.copy()
    too_high[3] = commitment[1] + 1
    with reverts("UsageSettlementAdapterSumTooHigh"):
        await world.chain.transact(world.node, fn(node, tuple(too_high), (payers, [(adapters[0][0], 0, commitment[1] + 1)])))
    # A payer without enough escrow makes the whole commit revert in the escrow.
    rich = await world.leaf(world.stranger)
    with reverts("PaymentEscrowInsufficientBalance"):
        await s.commit_batch(world.node, node, build_batch([rich]), CID)


async def test_finalize_pays_adapters_node_and_protocol(world: World) -> None:
    batch, batch_id, _ = await _committed(world)
    s, totals = world.c.settlement, batch.totals()
    with reverts("UsageSettlementChallengeWindowOpen"):
        await s.finalize_batch(world.stranger, batch_id, totals)
    await world.chain.increase_time(CONFIG.challenge_window)
    with reverts("UsageSettlementTotalsMismatch"):
        await s.finalize_batch(world.stranger, batch_id, (totals[0], totals[1][:1]))
    receipt = await s.finalize_batch(world.stranger, batch_id, totals)
    event = s.events(receipt, "BatchFinalized")[0]
    total = batch.payer_tree.root.sum
    assert event["adapterRevenue"] + event["nodeFee"] + event["protocolFee"] == total
    assert (await s.batch_of(batch_id)).status == s.FINALIZED
    assert await world.c.token.balance_of(s.address) == total
    assert await world.c.escrow.total_locked() == 0
    fee_bps = CONFIG.protocol_fee_bps
    for adapter_id, version, amount in batch.adapter_totals:
        assert await s.undistributed_of(adapter_id, version) == amount - amount * fee_bps // 10_000
    node_gross = total - batch.adapter_tree.root.sum
    assert await s.claimable_of(world.node.address) == node_gross - node_gross * fee_bps // 10_000
    assert await s.claimable_of(world.deployer.address) == event["protocolFee"]
    with reverts("UsageSettlementNotPending"):
        await s.finalize_batch(world.stranger, batch_id, totals)
    with reverts("UsageSettlementUnknownBatch"):
        await s.finalize_batch(world.stranger, 99, totals)


async def test_distribute_and_claim(world: World) -> None:
    batch, batch_id, _ = await _committed(world)
    s = world.c.settlement
    await world.chain.increase_time(CONFIG.challenge_window)
    await s.finalize_batch(world.stranger, batch_id, batch.totals())
    revenue = await s.undistributed_of(1, 0)
    with reverts("UsageSettlementNothingToDistribute"):
        await s.distribute(world.stranger, 1, 7)
    await s.distribute(world.stranger, 1, 0)
    assert await s.undistributed_of(1, 0) == 0
    second = revenue * 3_000 // 10_000
    assert await s.claimable_of(world.contributor.address) == second
    owner_share = revenue - second
    await s.distribute(world.stranger, 2, 0)
    owner_share += (await s.claimable_of(world.owner.address)) - owner_share
    before = await world.c.token.balance_of(world.contributor.address)
    receipt = await s.claim(world.contributor)
    assert s.events(receipt, "Claimed")[0]["amount"] == second
    assert await world.c.token.balance_of(world.contributor.address) == before + second
    with reverts("UsageSettlementNothingToClaim"):
        await s.claim(world.contributor)
    # The node claims to another address.
    fee = await s.claimable_of(world.node.address)
    await s.claim(world.node, world.stranger.address)
    assert await world.c.token.balance_of(world.stranger.address) == 1_000_000 * 10**18 + fee


async def test_views_hash_like_python(world: World) -> None:
    leaf = await world.leaf(world.payer_a)
    s = world.c.settlement
    assert await s._call("leafHash", leaf.as_abi()) == leaf.hash
    assert await s._call("requestDigest", leaf.request.as_tuple()) == leaf.request.digest(world.domain)
    assert await s.check_leaf(world.node.address, 2**40, leaf.as_abi()) == 0
    payers, adapters = honest_totals([leaf])
    assert payers == [(world.payer_a.address, leaf.record.charge)]
    assert adapters == [(1, 0, leaf.record.adapter_amount)]
    assert replace(leaf.record, charge=1) != leaf.record
    assert Tree.PAYER.other is Tree.ADAPTER
