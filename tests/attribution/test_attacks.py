"""Issue 9's attacks on settlement v1, each replayed against v2 on a real anvil (docs/contracts.md has the
threat table: attack -> defence -> this test -> what v1 did)."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

from attribution.aggregation import Tree, build_batch, price
from attribution.chain import challenge_commitment, name_commitment
from attribution.deploy import create_address
from attribution.errors import ChainError
from attribution.types import intervals_overlap
from tests.attribution.helpers import (
    CONFIG,
    DEPOSIT,
    E18,
    NODE_FEE,
    NODE_STAKE,
    PRICES,
    World,
    reverts,
    withheld_batch,
)
from tests.attribution.test_fraud import BAD_SIGNATURE, WRONG_PRICE, assert_unchallengeable, honest_leaves

# ---------------------------------------------------------------- 1: withheld data (P1)


async def test_attack1_withheld_leaf_cannot_charge_a_payer_who_never_signed(world: World) -> None:
    """A node commits a slot whose preimage it never reveals, charging a payer who only deposited. v2 asks
    for a voucher the payer signed for this node: the node cannot make one."""
    victim, node = world.payer_b, world.node.address
    shown = await world.leaf(world.payer_a)
    forged = (await world.leaf(victim, signer_key=world.node_signer.key)).voucher  # signed by the node
    with reverts("UsageSettlementBadVoucherSignature"):
        await world.commit(withheld_batch([shown], {victim.address: 900 * E18}, {victim.address: forged}))
    elsewhere = (await world.leaf(victim, node=world.stranger.address)).voucher  # the payer's, another node's
    with reverts("UsageSettlementVoucherMismatch"):
        await world.commit(withheld_batch([shown], {victim.address: 900 * E18}, {victim.address: elsewhere}))
    assert (await world.c.escrow.account_of(victim.address, node)).balance == DEPOSIT


async def test_attack1_withheld_leaf_is_bounded_by_what_the_payer_signed(world: World) -> None:
    """A payer that signed caps up to C for this node loses at most C, whatever the node withholds:
    C - 1 and C commit, C + 1 reverts."""
    victim, node = world.payer_b, world.node.address
    signed = await world.leaf(victim)
    cap = signed.request.cumulative_cap
    shown = await world.leaf(world.payer_a)
    for phantom, ok in ((cap - 1, True), (cap, True), (cap + 1, False)):
        snapshot = await world.chain.snapshot()
        batch = withheld_batch([shown], {victim.address: phantom}, {victim.address: signed.voucher})
        if ok:
            await world.commit(batch)
            assert await world.c.escrow.collected_of(victim.address, node) == phantom <= cap
        else:
            with reverts("PaymentEscrowOverCap"):
                await world.commit(batch)
        await world.chain.revert(snapshot)


# ---------------------------------------------------------------- 2: revoked key (P4)


async def test_attack2_revoked_key_cannot_charge_with_a_backdated_servedAt(world: World) -> None:
    """A leaked dApp key signs after its revocation took effect; the node backdates servedAt to before it.
    Signatures are judged at the commit, not at servedAt: the voucher is refused, and a leaf it signed
    (with a valid voucher beside it) is provably bad."""
    s, leaked = world.c.settlement, world.dapp_signer
    receipt = await world.c.escrow.revoke_signer(world.payer_a, leaked.address)
    until = world.c.escrow.events(receipt, "SignerRevoked")[0]["until"]
    before = await world.chain.timestamp()
    await world.chain.increase_time(CONFIG.notice_period)
    assert await world.chain.timestamp() >= until
    backdated = await world.leaf(world.payer_a, signer_key=leaked.key, served_at=before,
                                 deadline=before + CONFIG.max_request_ttl)
    assert backdated.record.served_at < until
    with reverts("UsageSettlementBadVoucherSignature"):
        await world.commit(build_batch([backdated]))
    own = await world.leaf(world.payer_a)  # the payer's own request: the voucher
    batch = build_batch([backdated, own])
    batch_id = await world.commit(batch)
    receipt = await s.prove_invalid_record(world.challenger, batch_id, batch, Tree.PAYER,
                                           batch.index_of(Tree.PAYER, backdated))
    assert s.events(receipt, "BatchVoided")[0]["reason"] == BAD_SIGNATURE


async def test_attack2_revocation_takes_effect_at_its_time(world: World) -> None:
    """Boundary: a key revoked at `until` is good for a commit at until - 1 and refused at until."""
    s, leaked, node = world.c.settlement, world.dapp_signer, world.node.address
    receipt = await world.c.escrow.revoke_signer(world.payer_a, leaked.address)
    until = world.c.escrow.events(receipt, "SignerRevoked")[0]["until"]
    leaf = await world.leaf(world.payer_a, signer_key=leaked.key, served_at=until - 2)
    batch = build_batch([leaf])
    commit = s.contract.functions.commitBatch(node, batch.commitment("x"), batch.totals(), batch.vouchers_abi())
    for at, ok in ((until - 1, True), (until, False)):
        snapshot = await world.chain.snapshot()
        await world.chain.rpc("evm_setNextBlockTimestamp", [at])
        # Explicit gas: anvil estimates at the latest block's time, not at the timestamp set for the next.
        if ok:
            receipt = await world.chain.transact(world.node_signer, commit, gas=3_000_000)
            batch_id = s.events(receipt, "BatchCommitted")[0]["batchId"]
            assert (await s.batch_of(batch_id)).committed_at == until - 1
        else:
            with pytest.raises(ChainError, match="failed on chain"):
                await world.chain.transact(world.node_signer, commit, gas=3_000_000)
            assert await s.batch_count() == 0
        await world.chain.revert(snapshot)
    e = world.c.escrow
    assert await e.signer_valid_at(world.payer_a.address, leaked.address, until - 1)
    assert not await e.signer_valid_at(world.payer_a.address, leaked.address, until)
    assert await s.check_leaf(node, until - 1, leaf.as_abi()) == 0
    assert await s.check_leaf(node, until, leaf.as_abi()) == BAD_SIGNATURE


# ---------------------------------------------------------------- 3: payer gets an honest node slashed (P2)


async def test_attack3_payer_cannot_get_an_honest_node_slashed(world: World) -> None:
    """v1: a payer signs two requests with one nonce; the node serves both; the payer proves a duplicate.
    v2: the request's identity is its interval, which the node checks before serving; the second request
    on a served interval is refused, and against the batches the node did commit every proof reverts."""
    served = [await world.leaf(world.payer_a)]
    twin = await world.leaf(world.payer_a, 2, cumulative_cap=served[0].request.cumulative_cap,
                            max_charge=served[0].request.max_charge)  # same interval, another prompt
    assert twin.request.digest(world.domain) != served[0].request.digest(world.domain)
    # The honest node's rule before serving (the journal keeps every interval it served per payer).
    assert intervals_overlap(twin.request.interval, served[0].request.interval)
    later = await world.leaf(world.payer_a, 1, cumulative_cap=served[0].request.cumulative_cap + 1, max_charge=1)
    assert intervals_overlap(later.request.interval, served[0].request.interval) is False  # adjacent is fine
    first = build_batch([*served, *(await honest_leaves(world))[:3]])
    first_id = await world.commit(first)
    second = build_batch([await world.leaf(world.payer_a), await world.leaf(world.payer_b)])
    second_id = await world.commit(second)
    await assert_unchallengeable(world, first_id, first, [(second_id, second)])
    await assert_unchallengeable(world, second_id, second, [(first_id, first)])
    assert (await world.c.nodes.node_of(world.node.address)).stake == NODE_STAKE


# ---------------------------------------------------------------- 4: escrow games (P3)


async def test_a_commit_held_past_its_deadline_is_refused_not_fraud(world: World) -> None:
    """An honest node's commit held back (a congested mempool, a sequencer's delay, a node that died and
    whose cancellation never went out) and mined after `deadline + maxCommitDelay` of a record in it would
    be provable fraud: batch voided, node slashed. `Commitment.commitBy` makes the contract refuse it
    instead: mined one second late it reverts and charges nobody; at `commitBy` it lands. Without the
    bound (the old behaviour, commitBy at its maximum) the same late commit lands and is slashed."""
    s, node = world.c.settlement, world.node.address
    leaf = await world.leaf(world.payer_a)
    commit_by = leaf.request.deadline + CONFIG.max_commit_delay
    batch = build_batch([leaf])
    await world.chain.rpc("evm_setNextBlockTimestamp", [commit_by + 1])  # estimated now, mined late
    with pytest.raises(ChainError):
        await s.commit_batch(world.node_signer, node, batch, "bafy-late", commit_by=commit_by)
    assert (await world.c.escrow.account_of(world.payer_a.address, node)).balance == DEPOSIT
    assert "bafy-late" not in {log["args"]["cid"] for log in await s.contract.events.BatchCommitted.get_logs(from_block=0)}
    # Unbounded, the late commit lands, and anyone proves it late: the node is slashed for being slow.
    stake = (await world.c.nodes.node_of(node)).stake
    unbounded, _ = await s.commit_batch(world.node_signer, node, batch, "bafy-unbounded")
    receipt = await s.prove_invalid_record(world.challenger, unbounded, batch, Tree.PAYER, 0)
    assert s.events(receipt, "BatchVoided")[0]["batchId"] == unbounded
    assert (await world.c.nodes.node_of(node)).stake < stake


async def test_a_commit_at_its_commit_by_lands(world: World) -> None:
    s, node = world.c.settlement, world.node.address
    leaf = await world.leaf(world.payer_a)
    commit_by = leaf.request.deadline + CONFIG.max_commit_delay
    await world.chain.rpc("evm_setNextBlockTimestamp", [commit_by])
    batch_id, receipt = await s.commit_batch(world.node_signer, node, build_batch([leaf]), "x", commit_by=commit_by)
    assert (await world.chain.w3.eth.get_block(receipt["blockNumber"]))["timestamp"] == commit_by
    assert (await s.batch_of(batch_id)).status == 1


async def _second_node(world: World) -> str:
    c, other = world.c, world.stranger
    await c.token.approve(other, c.nodes.address, 2**256 - 1)
    await c.nodes.register(other, other.address, "http://other", NODE_FEE, NODE_STAKE)
    return other.address


async def test_attack4a_spending_elsewhere_cannot_short_this_node(world: World) -> None:
    """v1: one balance spent at two nodes made the second node's commit revert with every other payer's
    records in it. v2: another node can only collect from the payer's account for that node, and a short
    payer is covered from the committing node's stake, so the other payers' records stand."""
    node, other = world.node.address, await _second_node(world)
    mine = await world.leaf(world.payer_a)
    theirs = await world.leaf(world.payer_a, node=other)
    await world.commit(build_batch([theirs]), sender=world.stranger, node=other)
    assert (await world.c.escrow.account_of(world.payer_a.address, node)).balance == DEPOSIT
    assert (await world.c.escrow.account_of(world.payer_a.address, other)).balance == 0
    batch = build_batch([mine, await world.leaf(world.payer_b)])
    batch_id = await world.commit(batch)
    assert (await world.c.settlement.batch_of(batch_id)).covered == 0
    assert (await world.c.escrow.account_of(world.payer_a.address, node)).balance == DEPOSIT - mine.record.charge


async def test_attack4b_withdrawal_cannot_outrun_the_commit(world: World) -> None:
    """v1: withdraw() could run right before the commit. v2: a withdrawal announced after serving thaws for
    longer than the latest commit time of anything served before it, and thawing funds stay collectable."""
    e, node = world.c.escrow, world.node.address
    leaf = await world.leaf(world.payer_a)
    await e.request_withdrawal(world.payer_a, node, DEPOSIT)  # everything, right after being served
    latest_commit = leaf.request.deadline + CONFIG.max_commit_delay
    await world.chain.rpc("evm_setNextBlockTimestamp", [latest_commit])
    with reverts("PaymentEscrowStillThawing"):
        await e.withdraw(world.payer_a, node)
    await world.chain.rpc("evm_setNextBlockTimestamp", [latest_commit])
    batch_id = await world.commit(build_batch([leaf]))
    assert (await world.c.settlement.batch_of(batch_id)).covered == 0  # paid from escrow, not stake
    await world.chain.increase_time(CONFIG.thaw_period)
    receipt = await e.withdraw(world.payer_a, node)
    assert e.events(receipt, "Withdrawn")[0]["amount"] == DEPOSIT - leaf.record.charge


async def test_attack4c_payers_own_node_cannot_lock_funds_meant_for_us(world: World) -> None:
    """v1: a payer front-ran with its own node and adapter to lock its own balance. v2: its own node can
    only collect from the payer's account for its own node."""
    node, own = world.node.address, await _second_node(world)
    served = await world.leaf(world.payer_a)
    await world.c.escrow.deposit(world.payer_a, own, 5 * E18)
    greedy = await world.leaf(world.payer_a, 1, 10_000, 10_000, node=own, max_charge=DEPOSIT,
                              cumulative_cap=DEPOSIT)
    await world.commit(build_batch([greedy]), sender=world.stranger, node=own)
    assert (await world.c.escrow.account_of(world.payer_a.address, node)).balance == DEPOSIT
    batch_id = await world.commit(build_batch([served]))
    assert (await world.c.settlement.batch_of(batch_id)).covered == 0


# ---------------------------------------------------------------- 5: unsigned input tokens (P5)


async def test_attack5_node_cannot_bill_more_input_tokens_than_signed(world: World) -> None:
    """v1: the record carried inputTokens, so a 100-token prompt could be billed as 219. v2: the payer signs
    inputTokens; a record priced for more is provably mispriced."""
    billed_adapter, billed_charge = price(*PRICES[1], NODE_FEE, 219, 50)
    inflated = await world.leaf(world.payer_a, 1, 100, 50, adapter_amount=billed_adapter, charge=billed_charge)
    assert inflated.request.input_tokens == 100 and billed_charge <= inflated.request.max_charge
    batch = build_batch([inflated, await world.leaf(world.payer_a)])
    batch_id = await world.commit(batch)
    s = world.c.settlement
    receipt = await s.prove_invalid_record(world.challenger, batch_id, batch, Tree.PAYER,
                                           batch.index_of(Tree.PAYER, inflated))
    assert s.events(receipt, "BatchVoided")[0]["reason"] == WRONG_PRICE


# ---------------------------------------------------------------- 6: smaller items (P4, P6)


async def test_slash_is_proportional_and_rewards_do_not_halve(world: World) -> None:
    """v1 slashed 50% of the stake whatever the batch, so each void halved the next reward. v2 slashes
    slashBps of the batch's charges (at least minSlash, at most what is staked)."""
    s, node, fee = world.c.settlement, world.node.address, 10**16
    await world.c.nodes.set_fee(world.node, fee)
    await world.chain.increase_time(CONFIG.notice_period + 1)
    slashes = []
    for charge in (100 * E18, 100 * E18, E18):
        # A base-model record worth `charge` whose digest field is wrong: provable, same charge.
        bad = await world.leaf(world.payer_a, 0, 1, charge // fee - 1, fee=fee, request_digest=b"\x11" * 32)
        batch = build_batch([bad])
        assert batch.charge == charge
        batch_id = await world.commit(batch)
        receipt = await s.prove_invalid_record(world.challenger, batch_id, batch, Tree.PAYER, 0)
        event = s.events(receipt, "BatchVoided")[0]
        slashes.append((event["slashed"], event["reward"]))
    big = 100 * E18 * CONFIG.slash_bps // 10_000
    assert slashes[0] == slashes[1] == (big, big * CONFIG.challenger_reward_bps // 10_000)
    small = max(CONFIG.min_slash, E18 * CONFIG.slash_bps // 10_000)
    assert small == CONFIG.min_slash  # a small batch still costs the node minSlash
    assert slashes[2] == (small, small * CONFIG.challenger_reward_bps // 10_000)
    assert (await world.c.nodes.node_of(node)).stake == NODE_STAKE - 2 * big - small


async def test_zero_totals_are_refused(world: World) -> None:
    """v1 accepted zero-amount totals that nobody could challenge (and that bloated finalize)."""
    batch = build_batch([await world.leaf(world.payer_a), await world.leaf(world.payer_b, 2)])
    payers, adapters = batch.totals()
    fn = world.c.settlement.contract.functions.commitBatch
    extra = ("0xFFfFfFffFFfffFFfFFfFFFFFffFFFffffFfFFFfF", 0)
    with reverts("UsageSettlementZeroAmount"):
        await world.chain.transact(world.node, fn(world.node.address, batch.commitment("x"),
                                                  ([*payers, extra], adapters),
                                                  [*batch.vouchers_abi(), batch.vouchers_abi()[0]]))
    with reverts("UsageSettlementZeroAmount"):
        await world.chain.transact(world.node, fn(world.node.address, batch.commitment("x"),
                                                  (payers, [*adapters, (3, 0, 0)]), batch.vouchers_abi()))


@pytest.mark.parametrize("payers", [CONFIG.max_payers_per_batch - 1, CONFIG.max_payers_per_batch,
                                    CONFIG.max_payers_per_batch + 1])
async def test_payer_entries_are_capped(world: World, payers: int) -> None:
    accounts = [Account.create() for _ in range(payers)]
    batch = build_batch([await world.leaf(account, 0) for account in accounts])
    if payers <= CONFIG.max_payers_per_batch:
        await world.commit(batch)
    else:
        with reverts("UsageSettlementBadPayerCount"):
            await world.commit(batch)


@pytest.mark.parametrize("entries", [CONFIG.max_adapter_entries_per_batch - 1, CONFIG.max_adapter_entries_per_batch,
                                     CONFIG.max_adapter_entries_per_batch + 1])
async def test_adapter_entries_are_capped(world: World, entries: int) -> None:
    leaves = [await world.leaf(world.payer_a, 1, version=v, prices=PRICES[1]) for v in range(entries)]
    batch = build_batch(leaves)  # (adapter 1, version v) entries: records are bad, the shape is what counts
    assert len(batch.adapter_totals) == entries
    if entries <= CONFIG.max_adapter_entries_per_batch:
        await world.commit(batch)
    else:
        with reverts("UsageSettlementTooManyAdapterEntries"):
            await world.commit(batch)


async def test_front_running_a_proof_earns_nothing(world: World) -> None:
    """v1 paid the reward to whoever sent the proof first, so a copier could take it from the mempool. v2
    pays it only to a sender that committed to the exact proof in an earlier block; a copy still voids the
    batch (payers first) but the reward goes to the treasury."""
    s = world.c.settlement
    bad = await world.leaf(world.payer_a, max_charge=1)
    batch = build_batch([bad, await world.leaf(world.payer_a)])
    batch_id = await world.commit(batch)
    call = s.contract.functions.proveInvalidRecord(batch_id, batch.totals(), int(Tree.PAYER),
                                                   batch.leaf_proof(Tree.PAYER, batch.index_of(Tree.PAYER, bad)))
    data = call._encode_transaction_data()
    await s.commit_challenge(world.challenger, challenge_commitment(world.challenger.address, data))
    # The copier sends the challenger's pending proof as its own first.
    receipt = await world.chain.transact(world.stranger, call)
    event = s.events(receipt, "BatchVoided")[0]
    assert (event["challenger"], event["rewarded"]) == (world.stranger.address, world.deployer.address)
    assert await s.claimable_of(world.stranger.address) == 0
    assert await s.claimable_of(world.deployer.address) == event["slashed"]  # reward + the rest: treasury
    with reverts("UsageSettlementNotPending"):
        await world.chain.transact(world.challenger, call)


async def test_a_commitment_in_the_same_block_earns_nothing(world: World) -> None:
    s, ch = world.c.settlement, world.challenger
    bad = await world.leaf(world.payer_a, max_charge=1)
    batch = build_batch([bad, await world.leaf(world.payer_a)])
    batch_id = await world.commit(batch)
    call = s.contract.functions.proveInvalidRecord(batch_id, batch.totals(), int(Tree.PAYER),
                                                   batch.leaf_proof(Tree.PAYER, batch.index_of(Tree.PAYER, bad)))
    data = call._encode_transaction_data()
    commit = s.contract.functions.commitChallenge(challenge_commitment(ch.address, data))
    w3 = world.chain.w3
    nonce = await w3.eth.get_transaction_count(ch.address)
    await world.chain.rpc("evm_setAutomine", [False])
    try:
        hashes = []
        for offset, fn in enumerate((commit, call)):
            tx = {"from": ch.address, "to": s.address, "data": fn._encode_transaction_data(), "value": 0,
                  "chainId": world.chain.chain_id, "nonce": nonce + offset, "gas": 2_000_000,
                  "gasPrice": await w3.eth.gas_price}
            hashes.append(await w3.eth.send_raw_transaction(Account.sign_transaction(tx, ch.key).raw_transaction))
        await world.chain.rpc("evm_mine")
    finally:
        await world.chain.rpc("evm_setAutomine", [True])
    receipts = [await w3.eth.wait_for_transaction_receipt(h) for h in hashes]
    assert receipts[0]["blockNumber"] == receipts[1]["blockNumber"]
    event = s.events(receipts[1], "BatchVoided")[0]
    assert (event["challenger"], event["rewarded"]) == (ch.address, world.deployer.address)


async def _deploy(world: World, *, notice: int = CONFIG.notice_period, thaw: int = CONFIG.thaw_period,
                  **settlement: object) -> str:
    """Deploys the escrow, the node registry and a settlement with raw values (no Python validation)."""
    chain, deployer = world.chain, world.deployer
    token, adapters = world.c.token.address, world.c.adapters.address
    nonce = await chain.w3.eth.get_transaction_count(deployer.address, "pending")
    predicted = create_address(deployer.address, nonce + 2)
    nodes = await chain.deploy(deployer, "NodeRegistry", token, predicted, CONFIG.min_stake, CONFIG.unbonding_delay,
                               notice)
    escrow = await chain.deploy(deployer, "PaymentEscrow", token, predicted, thaw, notice)
    values = {
        "treasury": deployer.address, "challenge_window": CONFIG.challenge_window,
        "max_request_ttl": CONFIG.max_request_ttl, "max_commit_delay": CONFIG.max_commit_delay,
        "protocol_fee_bps": 250, "slash_bps": 5_000, "challenger_reward_bps": 5_000, "min_slash": 1,
        "max_payers": 8, "max_adapters": 8, **settlement,
    }
    config = (token, escrow, nodes, adapters, *values.values())
    return await chain.deploy(deployer, "UsageSettlement", config)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"notice": 0}, "noticePeriod must exceed maxRequestTtl + maxCommitDelay"),
    ({"notice": CONFIG.max_request_ttl + CONFIG.max_commit_delay},
     "noticePeriod must exceed maxRequestTtl + maxCommitDelay"),
    ({"thaw": CONFIG.max_request_ttl + CONFIG.max_commit_delay},
     "thawPeriod must exceed maxRequestTtl + maxCommitDelay"),
    ({"treasury": "0x" + "00" * 20}, "treasury is the zero address"),
    ({"challenge_window": 0}, "challengeWindow is 0"),
    ({"max_commit_delay": 0}, "maxCommitDelay is 0"),
    ({"slash_bps": 0}, "slashBps not in 1..10000"),
    ({"slash_bps": 10_001}, "slashBps not in 1..10000"),
    ({"protocol_fee_bps": 10_001}, "basis points above 10000"),
    ({"challenger_reward_bps": 10_001}, "basis points above 10000"),
    ({"max_payers": 0}, "batch entry caps are 0"),
    ({"challenge_window": CONFIG.unbonding_delay}, "unbondingDelay must exceed challengeWindow"),
])
async def test_deployment_refuses_unsafe_parameters(world: World, overrides: dict, reason: str) -> None:
    with reverts("UsageSettlementBadConfig") as info:
        await _deploy(world, **overrides)
    assert info.value.error_args == (reason,)


async def test_deployment_accepts_the_boundary(world: World) -> None:
    serve = CONFIG.max_request_ttl + CONFIG.max_commit_delay
    address = await _deploy(world, notice=serve + 1, thaw=serve + 1, slash_bps=10_000, challenge_window=1)
    assert address.startswith("0x")


@pytest.mark.slow
async def test_full_batch_finalizes_and_voids_within_half_a_block(world: World) -> None:
    """P4 in gas: a batch at the default caps (256 payers, 512 fresh (adapter, version) entries: the worst
    case, every revenue slot written for the first time) finalizes, and is voided (256 refunds), each in
    well under a 30M-gas block."""
    from attribution.deploy import Contracts, DeployConfig, deploy_contracts

    defaults = DeployConfig()
    deployments = await deploy_contracts(world.chain, world.keys[0], DeployConfig(
        challenge_window=CONFIG.challenge_window, unbonding_delay=CONFIG.unbonding_delay))
    world.c = Contracts.attach(world.chain, deployments)
    c = world.c
    await c.token.mint(world.deployer, world.node.address, 10**6 * E18)
    await c.token.approve(world.node, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.node, world.node_signer.address, "http://node.test", NODE_FEE, 10**5 * E18)
    payers = [Account.from_key(secrets.token_bytes(32)) for _ in range(defaults.max_payers_per_batch)]
    leaves = [await world.leaf(payers[i % len(payers)], 1000 + i, 3, 4, prices=(1, 1))
              for i in range(defaults.max_adapter_entries_per_batch)]
    batch = build_batch(leaves)
    assert (len(batch.payer_totals), len(batch.adapter_totals)) == (256, 512)
    batch_id = await world.commit(batch)
    snapshot = await world.chain.snapshot()
    await world.chain.increase_time(CONFIG.challenge_window)
    finalize = await c.settlement.finalize_batch(world.stranger, batch_id, batch.totals())
    assert finalize["gasUsed"] < 15_000_000, finalize["gasUsed"]
    await world.chain.revert(snapshot)
    void = await c.settlement.prove_invalid_record(world.challenger, batch_id, batch, Tree.PAYER, 0)
    assert void["gasUsed"] < 15_000_000, void["gasUsed"]
    print(f"finalize {finalize['gasUsed']} gas, void {void['gasUsed']} gas at the default caps")


def test_threat_table_names_only_tests_that_exist() -> None:
    """docs/contracts.md cites these tests by name: each must exist here or in the fraud and invariant tests."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", (root / "docs" / "contracts.md").read_text()))
    defined = set()
    for path in (root / "tests" / "attribution").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M))
    assert cited and cited <= defined, sorted(cited - defined)


# ---------------------------------------------------------------- names: a claim seen in the mempool


async def test_front_running_a_name_claim_takes_nothing(world: World) -> None:
    """The owner's claim of a free name sits in the mempool; an attacker who reads it commits to the name and
    claims it for its own adapter, both at a higher price, so mined first in the same block. With first come,
    first served the attacker would hold the name (and dApps asking for it would sign the attacker's adapter);
    with commit-reveal its commitment is too new and the owner's claim lands."""
    a, owner, attacker, chain = world.c.adapters, world.owner, world.stranger, world.chain
    w3 = chain.w3
    theirs = await a.register(attacker, "bafy-squatter", bytes(32), 1, 1, [attacker.address], [10_000])
    salt = secrets.token_bytes(32)
    await a.commit_name(owner, name_commitment("sql-expert", 1, salt))
    await chain.increase_time(CONFIG.name_commit_delay)
    attacker_salt = secrets.token_bytes(32)
    price = await w3.eth.gas_price
    calls = [  # (sender, call, gas price): the owner's claim, then the attacker's reply to it
        (owner, a.contract.functions.setName("sql-expert", 1, salt), price),
        (attacker, a.contract.functions.commitName(name_commitment("sql-expert", theirs, attacker_salt)), 3 * price),
        (attacker, a.contract.functions.setName("sql-expert", theirs, attacker_salt), 2 * price),
    ]
    nonces = {s.address: await w3.eth.get_transaction_count(s.address) for s in (owner, attacker)}
    await chain.rpc("evm_setAutomine", [False])
    try:
        hashes = []
        for sender, fn, gas_price in calls:
            tx = {
                "from": sender.address,
                "to": a.address,
                "data": fn._encode_transaction_data(),
                "value": 0,
                "chainId": chain.chain_id,
                "nonce": nonces[sender.address],
                "gas": 300_000,
                "gasPrice": gas_price,
            }
            nonces[sender.address] += 1
            hashes.append(await w3.eth.send_raw_transaction(Account.sign_transaction(tx, sender.key).raw_transaction))
        await chain.rpc("evm_mine")
    finally:
        await chain.rpc("evm_setAutomine", [True])
    claim, commit, squat = [await w3.eth.wait_for_transaction_receipt(h) for h in hashes]
    assert claim["blockNumber"] == commit["blockNumber"] == squat["blockNumber"]
    assert squat["transactionIndex"] < claim["transactionIndex"]  # the attacker was mined first...
    assert (commit["status"], squat["status"], claim["status"]) == (1, 0, 1)  # ...and took nothing
    assert await a.adapter_id_by_name("sql-expert") == 1
    # Later, its commitment ripe, the attacker still cannot take a bound name.
    await chain.increase_time(CONFIG.name_commit_delay)
    with reverts("AdapterRegistryNameTaken"):
        await a.set_name(attacker, "sql-expert", theirs, attacker_salt)
