"""AdapterRegistry, NodeRegistry, PaymentEscrow and OpenToken: every external function, happy path and
each custom-error revert; thaw, unbonding and notice periods enforced in time."""

from __future__ import annotations

import asyncio

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from attribution.aggregation import build_batch
from attribution.chain import name_commitment
from attribution.errors import ChainError
from tests.attribution.helpers import CONFIG, DEPOSIT, NODE_FEE, NODE_STAKE, PRICES, World, claim, reverts

E18 = 10**18


async def test_adapter_register_and_views(world: World) -> None:
    a, owner = world.c.adapters, world.owner
    assert await a.adapter_count() == 2
    assert await a.adapter_id_of("bafy-adapter-one") == 1 and await a.adapter_id_of("nope") == 0
    info = await a.adapter(1)
    assert (info.owner, info.cid, info.version_count) == (owner.address, "bafy-adapter-one", 1)
    terms = await a.terms(1, 0)
    assert (terms.price_in, terms.price_out, terms.retired) == (*PRICES[1], False)
    assert await a.split(1, 0) == ([owner.address, world.contributor.address], [7_000, 3_000])
    now = await world.chain.timestamp()
    assert (await a.version_at(1, now))[0] == 0
    assert await a.version_at(1, 0) is None and await a.version_at(99, now) is None
    new_id = await a.register(world.stranger, "bafy-three", b"\x02" * 32, 5, 6, [world.stranger.address], [10_000])
    assert new_id == 3


async def test_adapter_register_reverts(world: World) -> None:
    a, s = world.c.adapters, world.stranger
    me = [s.address]
    with reverts("AdapterRegistryEmptyCid"):
        await a.register(s, "", bytes(32), 1, 1, me, [10_000])
    with reverts("AdapterRegistryDuplicateCid"):
        await a.register(s, "bafy-adapter-one", bytes(32), 1, 1, me, [10_000])
    with reverts("AdapterRegistrySharesLengthMismatch"):
        await a.register(s, "x", bytes(32), 1, 1, me, [5_000, 5_000])
    with reverts("AdapterRegistryBadContributorCount"):
        await a.register(s, "x", bytes(32), 1, 1, [], [])
    with reverts("AdapterRegistryBadContributorCount"):
        await a.register(s, "x", bytes(32), 1, 1, me * 17, [1] * 17)
    with reverts("AdapterRegistryZeroContributor"):
        await a.register(s, "x", bytes(32), 1, 1, ["0x" + "00" * 20], [10_000])
    with reverts("AdapterRegistryBadSharesSum"):
        await a.register(s, "x", bytes(32), 1, 1, me, [9_999])
    with reverts("AdapterRegistryUnknownAdapter"):
        await a.adapter(42)
    with reverts("AdapterRegistryUnknownVersion"):
        await a.terms(1, 5)


async def test_adapter_changes_take_effect_after_notice_and_keep_history(world: World) -> None:
    a, owner = world.c.adapters, world.owner
    receipt = await a.update_prices(owner, 1, 11, 22)
    event = a.events(receipt, "AdapterTermsUpdated")[0]
    assert event["version"] == 1 and event["since"] == (await world.chain.timestamp()) + CONFIG.notice_period
    now = await world.chain.timestamp()
    assert (await a.version_at(1, now))[0] == 0  # still the old prices
    assert (await a.version_at(1, now + CONFIG.notice_period))[1].price_in == 11
    await a.update_shares(owner, 1, [world.contributor.address], [10_000])
    assert await a.split(1, 2) == ([world.contributor.address], [10_000])
    assert (await a.terms(1, 2)).price_in == 11
    assert await a.split(1, 0) == ([owner.address, world.contributor.address], [7_000, 3_000])
    receipt = await a.retire(owner, 1)
    assert a.events(receipt, "AdapterRetired")[0]["version"] == 3
    with reverts("AdapterRegistryRetired"):
        await a.update_prices(owner, 1, 1, 1)
    with reverts("AdapterRegistryRetired"):
        await a.retire(owner, 1)
    await world.chain.increase_time(CONFIG.notice_period)
    assert (await a.version_at(1, await world.chain.timestamp()))[1].retired


async def test_adapter_owner_only(world: World) -> None:
    a, s = world.c.adapters, world.stranger
    with reverts("AdapterRegistryNotOwner"):
        await a.update_prices(s, 1, 1, 1)
    with reverts("AdapterRegistryNotOwner"):
        await a.update_shares(s, 1, [s.address], [10_000])
    with reverts("AdapterRegistryNotOwner"):
        await a.retire(s, 1)
    with reverts("AdapterRegistryNotOwner"):
        await a.transfer_ownership(s, 1, s.address)
    with reverts("AdapterRegistryUnknownAdapter"):
        await a.retire(s, 9)
    with reverts("AdapterRegistryZeroOwner"):
        await a.transfer_ownership(world.owner, 1, "0x" + "00" * 20)
    with reverts("AdapterRegistryBadSharesSum"):
        await a.update_shares(world.owner, 1, [s.address], [1])
    await a.transfer_ownership(world.owner, 1, s.address)
    assert (await a.adapter(1)).owner == s.address
    await a.update_prices(s, 1, 3, 4)


async def test_adapter_names(world: World) -> None:
    """A name points at one adapter; its owner moves it to a new version (a new CID, so a new adapter);
    nobody else can take it; the name rule holds at its bounds."""
    a, owner, s = world.c.adapters, world.owner, world.stranger
    assert await a.adapter_id_by_name("demo") == 0
    receipt = await claim(world, owner, "demo", 1)
    assert a.events(receipt, "AdapterNamed")[0] == {"name": "demo", "adapterId": 1, "previousAdapterId": 0}
    assert await a.adapter_id_by_name("demo") == 1 and await a.adapter_id_by_name("Demo") == 0
    receipt = await a.set_name(owner, "demo", 2)  # the owner's next version: a move needs no commitment
    assert a.events(receipt, "AdapterNamed")[0]["previousAdapterId"] == 1
    assert await a.adapter_id_by_name("demo") == 2
    mine = await a.register(s, "bafy-stranger", bytes(32), 1, 1, [s.address], [10_000])
    with reverts("AdapterRegistryNameTaken") as taken:
        await claim(world, s, "demo", mine)
    assert taken.value.error_args == ("demo", 2)
    with reverts("AdapterRegistryNotOwner"):
        await claim(world, s, "other", 1)
    with reverts("AdapterRegistryUnknownAdapter"):
        await claim(world, owner, "other", 99)
    longest = "a" + "-._9Z" * 12 + "xyz"  # 64 bytes
    await claim(world, s, longest, mine)
    assert await a.adapter_id_by_name(longest) == mine
    for bad in ("", longest + "b", "-lead", ".lead", "_lead", "sp ace", "sla/sh", "colon:1", "ü"):
        with reverts("AdapterRegistryBadName"):
            await claim(world, s, bad, mine)
    await a.transfer_ownership(owner, 2, s.address)  # the name follows the adapter it points to
    await a.set_name(s, "demo", mine)
    assert await a.adapter_id_by_name("demo") == mine
    await a.retire(s, mine)
    with reverts("AdapterRegistryRetired"):
        await claim(world, s, "fresh", mine)


async def test_claim_name_waits_for_the_chains_clock(world: World) -> None:
    """`claim_name` commits, waits until the chain's latest block is `nameCommitDelay` past the commitment
    (here: the test moves the dev chain's clock), then claims; on a chain whose clock stops it gives up."""
    a, chain = world.c.adapters, world.chain
    with pytest.raises(ChainError, match="did not reach"):
        await a.claim_name(world.owner, "stopped", 1, poll=0.01, timeout=0.3)
    task = asyncio.create_task(a.claim_name(world.owner, "waited", 1, poll=0.01))
    while not task.done():
        await asyncio.sleep(0.1)
        await chain.increase_time(CONFIG.name_commit_delay // 4)
    receipt = await task
    assert a.events(receipt, "AdapterNamed")[0]["adapterId"] == 1
    assert await a.adapter_id_by_name("waited") == 1
    assert (await a.claim_name(world.owner, "waited", 2)).status == 1  # held: a move, at once


async def set_name_at(world: World, timestamp: int, sender, name: str, adapter_id: int, salt: bytes) -> int:
    """Sends `setName` with a fixed gas limit (no estimate, which would run at another time) in a block at
    `timestamp`; returns the receipt's status (1 claimed, 0 reverted)."""
    chain, a = world.chain, world.c.adapters
    data = a.contract.functions.setName(name, adapter_id, salt)._encode_transaction_data()
    tx = {"from": sender.address, "to": a.address, "data": data, "value": 0, "chainId": chain.chain_id,
          "nonce": await chain.w3.eth.get_transaction_count(sender.address), "gas": 300_000,
          "gasPrice": await chain.w3.eth.gas_price}  # fmt: skip
    await chain.rpc("evm_setNextBlockTimestamp", [timestamp])
    sent = await chain.w3.eth.send_raw_transaction(Account.sign_transaction(tx, sender.key).raw_transaction)
    receipt = await chain.w3.eth.wait_for_transaction_receipt(sent)
    assert (await chain.w3.eth.get_block(receipt["blockNumber"]))["timestamp"] == timestamp
    return receipt["status"]


async def test_a_free_name_needs_a_ripe_commitment_of_the_claimer(world: World) -> None:
    """Claiming a free name takes the claimer's own commitment to (name, adapter, salt), at least
    `nameCommitDelay` and at most a day old; the contract's commitment hash is ours."""
    a, owner, s, chain = world.c.adapters, world.owner, world.stranger, world.chain
    salt = b"\x07" * 32
    commitment = name_commitment("ripe", 1, salt)
    assert await a._call("nameCommitment", "ripe", 1, salt) == commitment
    with reverts("AdapterRegistryNameNotCommitted") as info:  # no commitment at all
        await a.set_name(owner, "ripe", 1, salt)
    assert info.value.error_args == ("ripe", 0)
    committed_at = (await chain.w3.eth.get_block((await a.commit_name(owner, commitment))["blockNumber"]))["timestamp"]
    delay = await a.name_commit_delay()
    assert delay == CONFIG.name_commit_delay > 0
    # The owner's commitment copied from the mempool is of no use to another account, even ripe: it commits to
    # the owner's adapter, and the stranger's claim for its own adapter hashes to another commitment.
    mine = await a.register(s, "bafy-ripe-stranger", bytes(32), 1, 1, [s.address], [10_000])
    await a.commit_name(s, commitment)
    wrongs = (
        (owner, "ripe", 1, b"\x08" * 32),  # another salt
        (owner, "ripe", 2, salt),  # another adapter of the same owner
        (owner, "ripE", 1, salt),  # another name
        (s, "ripe", mine, salt),  # the stranger, with the copied commitment
    )
    for offset, wrong in enumerate(wrongs):  # all ripe: time is not what refuses them
        assert await set_name_at(world, committed_at + delay + offset, *wrong) == 0, wrong
    assert await set_name_at(world, committed_at + delay + len(wrongs), owner, "ripe", 1, salt) == 1
    assert await a.adapter_id_by_name("ripe") == 1
    await a.set_name(owner, "ripe", 2, salt)  # bound: the owner moves it, no commitment read
    edge = name_commitment("edge", 1, salt)  # the delay's boundary, to the second
    committed_at = (await chain.w3.eth.get_block((await a.commit_name(owner, edge))["blockNumber"]))["timestamp"]
    assert await set_name_at(world, committed_at + delay - 1, owner, "edge", 1, salt) == 0
    assert await set_name_at(world, committed_at + delay, owner, "edge", 1, salt) == 1
    stale = name_commitment("stale", 1, salt)
    committed_at = (await chain.w3.eth.get_block((await a.commit_name(owner, stale))["blockNumber"]))["timestamp"]
    assert await set_name_at(world, committed_at + 86_400 + 1, owner, "stale", 1, salt) == 0  # a day and a second
    committed_at = (await chain.w3.eth.get_block((await a.commit_name(owner, stale))["blockNumber"]))["timestamp"]
    assert await set_name_at(world, committed_at + 86_400, owner, "stale", 1, salt) == 1  # committed again: a day
    assert await a.adapter_id_by_name("stale") == 1


async def test_node_register_and_settings(world: World) -> None:
    n, node = world.c.nodes, world.node
    info = await n.node_of(node.address)
    assert (info.registered, info.signer, info.stake, info.endpoint) == (
        True,
        world.node_signer.address,
        NODE_STAKE,
        "http://node.test",
    )
    assert await n.is_active(node.address) and not await n.is_active(world.stranger.address)
    await n.set_signer(node, world.stranger.address)
    await n.set_endpoint(node, "https://node.example/v1")
    info = await n.node_of(node.address)
    assert (info.signer, info.endpoint) == (world.stranger.address, "https://node.example/v1")
    now = await world.chain.timestamp()
    await n.set_fee(node, 7)
    assert await n.fee_at(node.address, now) == NODE_FEE
    assert await n.fee_at(node.address, now + 1 + CONFIG.notice_period) == 7
    assert await n.fee_at(node.address, 0) is None
    await n.add_stake(node, 5 * E18)
    assert (await n.node_of(node.address)).stake == NODE_STAKE + 5 * E18


async def test_node_reverts(world: World) -> None:
    n, s = world.c.nodes, world.stranger
    await world.c.token.approve(s, n.address, 2**256 - 1)
    with reverts("NodeRegistryAlreadyRegistered"):
        await n.register(world.node, s.address, "", 1, NODE_STAKE)
    with reverts("NodeRegistryZeroSigner"):
        await n.register(s, "0x" + "00" * 20, "", 1, NODE_STAKE)
    with reverts("NodeRegistryStakeBelowMinimum"):
        await n.register(s, s.address, "", 1, CONFIG.min_stake - 1)
    for call in (
        n.add_stake(s, 1),
        n.set_signer(s, s.address),
        n.set_endpoint(s, "x"),
        n.set_fee(s, 1),
        n.unbond(s, 1),
        n.withdraw_unbonded(s),
    ):
        with reverts("NodeRegistryNotRegistered"):
            await call
    with reverts("NodeRegistryZeroAmount"):
        await n.add_stake(world.node, 0)
    with reverts("NodeRegistryZeroAmount"):
        await n.unbond(world.node, 0)
    with reverts("NodeRegistryZeroSigner"):
        await n.set_signer(world.node, "0x" + "00" * 20)
    with reverts("NodeRegistryInsufficientStake"):
        await n.unbond(world.node, NODE_STAKE + 1)
    with reverts("NodeRegistryNothingUnbonding"):
        await n.withdraw_unbonded(world.node)


async def test_unbonding_delay_and_inactivity(world: World) -> None:
    n, node = world.c.nodes, world.node
    before = await world.c.token.balance_of(node.address)
    receipt = await n.unbond(node, NODE_STAKE - CONFIG.min_stake + 1)
    end = n.events(receipt, "NodeUnbondingStarted")[0]["unbondingEnd"]
    assert end == await world.chain.timestamp() + CONFIG.unbonding_delay
    assert not await n.is_active(node.address)  # below the minimum stake: cannot commit
    with reverts("UsageSettlementNodeInactive"):
        await world.commit(build_batch([await world.leaf(world.payer_a)]), sender=node)
    with reverts("NodeRegistryStillUnbonding"):
        await n.withdraw_unbonded(node)
    await world.chain.increase_time(CONFIG.unbonding_delay)
    await n.withdraw_unbonded(node)
    assert await world.c.token.balance_of(node.address) == before + NODE_STAKE - CONFIG.min_stake + 1


async def test_escrow_deposits(world: World) -> None:
    e, payer, node = world.c.escrow, world.payer_a, world.node.address
    await e.deposit(payer, node, 5)
    await e.deposit_for(world.payer_b, world.payer_a.address, node, 6)
    assert (await e.account_of(payer.address, node)).balance == DEPOSIT + 11
    # Accounts are per (payer, node): a deposit for another node is not this node's.
    await e.deposit(payer, world.stranger.address, 7)
    assert (await e.account_of(payer.address, world.stranger.address)).balance == 7
    assert (await e.account_of(payer.address, node)).balance == DEPOSIT + 11
    with reverts("PaymentEscrowZeroAmount"):
        await e.deposit(payer, node, 0)
    with reverts("PaymentEscrowZeroNode"):
        await e.deposit(payer, "0x" + "00" * 20, 1)
    # EIP-2612 permit: no approve needed.
    s, token = world.stranger, world.c.token
    deadline = await world.chain.timestamp() + 3600
    permit = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "primaryType": "Permit",
        "domain": {
            "name": "OpenLoRA Token",
            "version": "1",
            "chainId": world.chain.chain_id,
            "verifyingContract": token.address,
        },
        "message": {
            "owner": s.address,
            "spender": e.address,
            "value": 10 * E18,
            "nonce": await token.nonces(s.address),
            "deadline": deadline,
        },
    }
    signed = Account.sign_message(encode_typed_data(full_message=permit), s.key)
    await e.deposit_with_permit(
        s, node, 10 * E18, deadline, signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")
    )
    assert (await e.account_of(s.address, node)).balance == 10 * E18


async def test_escrow_thaw_and_withdraw(world: World) -> None:
    e, payer, node = world.c.escrow, world.payer_a, world.node.address
    with reverts("PaymentEscrowNothingThawing"):
        await e.withdraw(payer, node)
    with reverts("PaymentEscrowInsufficientBalance"):
        await e.request_withdrawal(payer, node, DEPOSIT + 1)
    await e.request_withdrawal(payer, node, 100)
    account = await e.account_of(payer.address, node)
    assert (account.balance, account.thawing, account.available) == (DEPOSIT, 100, DEPOSIT - 100)
    assert account.thaw_end == await world.chain.timestamp() + CONFIG.thaw_period
    # A new announcement replaces the old one and restarts the thaw; 0 cancels.
    await e.request_withdrawal(payer, node, 0)
    assert await e.account_of(payer.address, node) == type(account)(DEPOSIT, 0, 0)
    with reverts("PaymentEscrowNothingThawing"):
        await e.withdraw(payer, node)
    await e.request_withdrawal(payer, node, 100)
    with reverts("PaymentEscrowStillThawing"):
        await e.withdraw(payer, node)
    await world.chain.increase_time(CONFIG.thaw_period - 5)
    with reverts("PaymentEscrowStillThawing"):
        await e.withdraw(payer, node)
    await world.chain.increase_time(5)
    before = await world.c.token.balance_of(payer.address)
    receipt = await e.withdraw(payer, node)
    assert e.events(receipt, "Withdrawn")[0]["amount"] == 100
    assert await world.c.token.balance_of(payer.address) == before + 100
    assert await e.account_of(payer.address, node) == type(account)(DEPOSIT - 100, 0, 0)


async def test_thawing_funds_stay_collectable(world: World) -> None:
    e, payer, node = world.c.escrow, world.payer_a, world.node.address
    await e.request_withdrawal(payer, node, DEPOSIT)  # everything thawing
    leaf = await world.leaf(payer)
    await world.commit(build_batch([leaf]))
    account = await e.account_of(payer.address, node)
    # The thawing part shrinks with the balance: the withdrawal gets what is left.
    assert (account.balance, account.thawing) == (DEPOSIT - leaf.record.charge, DEPOSIT - leaf.record.charge)
    await world.chain.increase_time(CONFIG.thaw_period)
    receipt = await e.withdraw(payer, node)
    assert e.events(receipt, "Withdrawn")[0]["amount"] == DEPOSIT - leaf.record.charge


async def test_escrow_signers(world: World) -> None:
    e, payer, signer = world.c.escrow, world.payer_b, world.stranger.address
    now = await world.chain.timestamp()
    assert await e.signer_valid_at(payer.address, payer.address, 0)
    assert not await e.signer_valid_at(payer.address, signer, now)
    assert await e.signer_of(payer.address, signer) == (0, 0)
    receipt = await e.authorize_signer(payer, signer)
    since = e.events(receipt, "SignerAuthorized")[0]["since"]
    assert not await e.signer_valid_at(payer.address, signer, since - 1)
    assert await e.signer_valid_at(payer.address, signer, since)
    with reverts("PaymentEscrowSignerAlreadyAuthorized"):
        await e.authorize_signer(payer, signer)
    with reverts("PaymentEscrowZeroSigner"):
        await e.authorize_signer(payer, "0x" + "00" * 20)
    receipt = await e.revoke_signer(payer, signer)
    until = e.events(receipt, "SignerRevoked")[0]["until"]
    assert until == await world.chain.timestamp() + CONFIG.notice_period
    assert await e.signer_of(payer.address, signer) == (since, until)
    assert await e.signer_valid_at(payer.address, signer, until - 1)
    assert not await e.signer_valid_at(payer.address, signer, until)
    with reverts("PaymentEscrowSignerNotAuthorized"):
        await e.revoke_signer(payer, signer)
    with reverts("PaymentEscrowSignerAlreadyAuthorized"):  # a revoked signer stays revoked
        await e.authorize_signer(payer, signer)


async def test_escrow_and_registry_settlement_only(world: World) -> None:
    f, n = world.c.escrow.contract.functions, world.c.nodes.contract.functions
    a, node = world.payer_a.address, world.node.address
    for fn in (f.collect(a, node, 1, 1), f.settle(1), f.refund(a, node, 1, 1)):
        with reverts("PaymentEscrowNotSettlement"):
            await world.chain.transact(world.stranger, fn)
    for fn in (n.slash(node, 1), n.cover(node, 1), n.returnCover(node, 1)):
        with reverts("NodeRegistryNotSettlement"):
            await world.chain.transact(world.stranger, fn)


async def test_token_mint_owner_only(world: World) -> None:
    with reverts("OwnableUnauthorizedAccount"):
        await world.c.token.mint(world.stranger, world.stranger.address, 1)
