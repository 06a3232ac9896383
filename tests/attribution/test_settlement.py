"""UsageSettlement v2: commit (vouchers, caps, collection, stake cover), finalize, distribute, claim (happy
paths and every commit revert)."""

from __future__ import annotations

from dataclasses import replace

from attribution.aggregation import Tree, Voucher, build_batch, honest_totals
from attribution.signing import sign_request
from tests.attribution.helpers import CONFIG, DEPOSIT, NODE_STAKE, World, assemble_batch, reverts

CID = "bafkreitestbatch"


async def _committed(world: World, leaves_spec=((3, 1), (3, 2), (4, 1))):
    payers = {3: world.payer_a, 4: world.payer_b}
    leaves = [await world.leaf(payers[p], adapter) for p, adapter in leaves_spec]
    batch = build_batch(leaves)
    batch_id, receipt = await world.c.settlement.commit_batch(world.node_signer, world.node.address, batch, CID)
    return batch, batch_id, receipt


async def test_commit_collects_from_accounts_and_records_header(world: World) -> None:
    batch, batch_id, receipt = await _committed(world)
    s, e, node = world.c.settlement, world.c.escrow, world.node.address
    assert batch_id == 1 and await s.batch_count() == 1
    header = await s.batch_of(batch_id)
    assert header.status == s.PENDING and header.node == node and header.covered == 0
    assert header.payer_root == batch.payer_tree.root.hash and header.payer_sum == batch.charge
    assert header.adapter_root == batch.adapter_tree.root.hash and header.depth == 2
    assert header.committed_at == await world.chain.timestamp()
    event = s.events(receipt, "BatchCommitted")[0]
    assert event["cid"] == CID and event["count"] == 3
    charged = dict(batch.payer_totals)
    for payer in (world.payer_a, world.payer_b):
        expected = sum(leaf.record.charge for leaf in batch.payer_leaves if leaf.request.payer == payer.address)
        assert charged[payer.address] == expected
        assert (await e.account_of(payer.address, node)).balance == DEPOSIT - expected
        assert await world.c.escrow.collected_of(payer.address, node) == expected
        # The voucher is the payer's highest-cap request and covers what was collected.
        voucher = batch.vouchers[[p for p, _ in batch.payer_totals].index(payer.address)]
        assert voucher.request.cumulative_cap == world.caps[payer.address] >= expected
    assert await e.total_collected() == batch.charge
    assert await s.pending_charges_of(node) == batch.charge


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
    payers, adapters = batch.totals()
    vouchers = batch.vouchers_abi()

    async def commit(c=commitment, p=payers, a=adapters, v=vouchers):
        await world.chain.transact(world.node, fn(node, tuple(c), (p, a), v))

    bad_shape = commitment.copy()
    bad_shape[5] = 5  # count 5 does not fit depth 1
    with reverts("UsageSettlementBadShape"):
        await commit(c=bad_shape)
    zero_count = commitment.copy()
    zero_count[5] = 0
    with reverts("UsageSettlementBadShape"):
        await commit(c=zero_count)
    with reverts("UsageSettlementBadPayerCount"):
        await commit(p=[], v=[])
    with reverts("UsageSettlementBadPayerCount"):  # one voucher per payer
        await commit(v=vouchers[:1])
    with reverts("UsageSettlementPayersNotSorted"):
        await commit(p=payers[::-1], v=vouchers[::-1])
    with reverts("UsageSettlementAdaptersNotSorted"):
        await commit(a=adapters[::-1])
    with reverts("UsageSettlementZeroAmount"):
        await commit(p=[payers[0], (payers[1][0], 0)])
    with reverts("UsageSettlementZeroAmount"):
        await commit(a=[adapters[0], (adapters[1][0], 0, 0)])
    with reverts("UsageSettlementBaseModelEntry"):
        await commit(a=[(0, 0, 1), *adapters])
    with reverts("UsageSettlementSumMismatch"):
        await commit(p=[(payers[0][0], 1), payers[1]])
    with reverts("UsageSettlementSumMismatch"):
        await commit(a=[adapters[0]])
    too_high = commitment.copy()
    too_high[3] = commitment[1] + 1
    with reverts("UsageSettlementAdapterSumTooHigh"):
        await commit(c=too_high, a=[(adapters[0][0], 0, commitment[1] + 1)])
    with reverts("UsageSettlementVoucherMismatch"):  # payer A's voucher shown for payer B
        await commit(v=[vouchers[0], vouchers[0]])
    a = [p for p, _ in payers].index(world.payer_a.address)
    other_node = replace(batch.vouchers[a].request, node=world.stranger.address)
    wrong = list(vouchers)
    wrong[a] = Voucher(other_node, sign_request(other_node, world.domain, world.payer_a.key)).as_abi()
    with reverts("UsageSettlementVoucherMismatch"):
        await commit(v=wrong)
    forged = batch.vouchers[0]
    forged = Voucher(forged.request, sign_request(forged.request, world.domain, world.stranger.key))
    with reverts("UsageSettlementBadVoucherSignature"):
        await commit(v=[forged.as_abi(), vouchers[1]])
    assert await s.batch_count() == 0


async def test_voucher_cap_bounds_the_payers_charge(world: World) -> None:
    """collected + charge <= cumulativeCap: limit - 1 and limit commit, limit + 1 reverts."""
    node = world.node.address
    leaf = await world.leaf(world.payer_a)
    charge = leaf.record.charge
    for cap, ok in ((charge + 1, True), (charge, True), (charge - 1, False)):
        snapshot = await world.chain.snapshot()
        request = replace(leaf.request, cumulative_cap=cap, max_charge=min(cap, leaf.request.max_charge))
        voucher = Voucher(request, sign_request(request, world.domain, world.payer_a.key))
        batch = assemble_batch([leaf], [leaf], vouchers={world.payer_a.address: voucher})
        if ok:
            await world.commit(batch)
            assert await world.c.escrow.collected_of(world.payer_a.address, node) == charge
        else:
            with reverts("PaymentEscrowOverCap") as info:
                await world.commit(batch)
            payer, node_, collected, signed_cap = info.value.error_args
            assert (payer.lower(), node_.lower(), collected, signed_cap) == (
                world.payer_a.address.lower(), node.lower(), charge, cap)
        await world.chain.revert(snapshot)


async def test_short_payer_is_covered_from_stake(world: World) -> None:
    """A payer whose account holds less than its charge: the escrow pays what it has, the node's stake the
    rest; the other payers' records stand (issue 9, 4a)."""
    s, e, node = world.c.settlement, world.c.escrow, world.node.address
    poor = world.stranger
    await world.c.token.approve(poor, e.address, 2**256 - 1)
    leaf_poor = await world.leaf(poor, 1, 1000, 1000)
    await e.deposit(poor, node, 1)  # far less than the charge
    leaf_a = await world.leaf(world.payer_a)
    batch = build_batch([leaf_poor, leaf_a])
    batch_id, receipt = await s.commit_batch(world.node_signer, node, batch, CID)
    deficit = leaf_poor.record.charge - 1
    short = s.events(receipt, "PayerShort")[0]
    assert (short["payer"], short["charge"], short["covered"]) == (poor.address, leaf_poor.record.charge, deficit)
    assert await s.deficit_of(batch_id, poor.address) == deficit
    assert (await s.batch_of(batch_id)).covered == deficit
    assert (await world.c.nodes.node_of(node)).stake == NODE_STAKE - deficit
    assert (await e.account_of(poor.address, node)).balance == 0
    assert (await e.account_of(world.payer_a.address, node)).balance == DEPOSIT - leaf_a.record.charge
    await world.chain.increase_time(CONFIG.challenge_window)
    await s.finalize_batch(world.stranger, batch_id, batch.totals())
    assert await world.c.token.balance_of(s.address) == batch.charge  # escrow part + covered part


async def test_stake_must_cover_pending_slash(world: World) -> None:
    """pendingCharges * slashBps <= stake * 10_000 at every commit (P6)."""
    s, node = world.c.settlement, world.node.address
    limit = NODE_STAKE * 10_000 // CONFIG.slash_bps  # charges the stake can back
    await world.c.token.approve(world.payer_a, world.c.escrow.address, 2**256 - 1)
    await world.c.escrow.deposit(world.payer_a, node, limit)
    fee = 10**16  # a fee per token that makes one record worth a lot
    await world.c.nodes.set_fee(world.node, fee)
    await world.chain.increase_time(CONFIG.notice_period + 1)
    big = await world.leaf(world.payer_a, 0, 100, (limit // fee) - 100, fee=fee)  # exactly `limit`
    assert big.record.charge == limit
    snapshot = await world.chain.snapshot()
    await world.commit(build_batch([big]))
    assert await s.pending_charges_of(node) == limit
    one_more = await world.leaf(world.payer_a, 0, 1, 0, fee=fee)
    with reverts("UsageSettlementStakeTooLow"):
        await world.commit(build_batch([one_more]))
    await world.chain.revert(snapshot)
    over = await world.leaf(world.payer_a, 0, 100, (limit // fee) - 99, fee=fee)
    with reverts("UsageSettlementStakeTooLow"):
        await world.commit(build_batch([over]))


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
    total = batch.charge
    assert event["adapterRevenue"] + event["nodeFee"] + event["protocolFee"] == total
    assert (await s.batch_of(batch_id)).status == s.FINALIZED
    assert await world.c.token.balance_of(s.address) == total
    assert await world.c.escrow.total_collected() == 0
    assert await s.pending_charges_of(world.node.address) == 0
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
    revenue = {(a, v): await s.undistributed_of(a, v) for a, v, _ in batch.adapter_totals}
    with reverts("UsageSettlementNothingToDistribute"):
        await s.distribute(world.stranger, 1, 7)
    await s.distribute(world.stranger, 1, 0)
    assert await s.undistributed_of(1, 0) == 0
    second = revenue[(1, 0)] * 3_000 // 10_000
    assert await s.claimable_of(world.contributor.address) == second
    await s.distribute(world.stranger, 2, 0)
    # The owner: the rest of adapter 1 (70% plus rounding) and all of adapter 2.
    assert await s.claimable_of(world.owner.address) == revenue[(1, 0)] - second + revenue[(2, 0)]
    before = await world.c.token.balance_of(world.contributor.address)
    receipt = await s.claim(world.contributor)
    assert s.events(receipt, "Claimed")[0]["amount"] == second
    assert await world.c.token.balance_of(world.contributor.address) == before + second
    with reverts("UsageSettlementNothingToClaim"):
        await s.claim(world.contributor)
    fee = await s.claimable_of(world.node.address)
    await s.claim(world.node, world.stranger.address)
    assert await world.c.token.balance_of(world.stranger.address) == 1_000_000 * 10**18 + fee


async def test_base_model_requests_pay_the_node_fee_only(world: World) -> None:
    s = world.c.settlement
    base = await world.leaf(world.payer_a, 0, 30, 20)
    assert (base.record.adapter_amount, base.record.terms_version) == (0, 0)
    assert base.record.charge == 50 * 10**9
    mixed = build_batch([base, await world.leaf(world.payer_b, 1)])
    assert [a for a, _, _ in mixed.adapter_totals] == [1]  # the base model's 0 revenue is left out
    assert mixed.adapter_leaves[0].hash == base.hash  # adapter-tree key (0, 0, ...) sorts first
    batch_id = await world.commit(mixed)
    assert await s.check_leaf(world.node.address, await world.chain.timestamp(), base.as_abi()) == 0
    await world.chain.increase_time(CONFIG.challenge_window)
    await s.finalize_batch(world.stranger, batch_id, mixed.totals())
    assert await s.undistributed_of(0, 0) == 0


async def test_views_hash_like_python(world: World) -> None:
    leaf = await world.leaf(world.payer_a)
    s = world.c.settlement
    assert await s._call("leafHash", leaf.as_abi()) == leaf.hash
    assert await s._call("requestDigest", leaf.request.as_tuple()) == leaf.request.digest(world.domain)
    assert await s._call("usageRecordDigest", leaf.record.as_tuple()) == leaf.record.digest(world.domain)
    now = await world.chain.timestamp()
    assert await s.check_leaf(world.node.address, now, leaf.as_abi()) == 0
    assert await s.check_leaf(world.stranger.address, now, leaf.as_abi()) == 1  # WrongNode
    payers, adapters = honest_totals([leaf])
    assert payers == [(world.payer_a.address, leaf.record.charge)]
    assert adapters == [(1, 0, leaf.record.adapter_amount)]
    assert build_batch([leaf]).leaves(Tree.ADAPTER) == [leaf]
