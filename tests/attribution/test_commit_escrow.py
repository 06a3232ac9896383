"""A payer's free escrow as the node counts it (`Accountant._check_escrow`: the account's balance minus what is
thawing, through ChainLedger's cache, less the journal's uncommitted charges) around the node's own commit, on a
real anvil with the real submitter, journal and IPFS node. The commit takes the charges from the account and
the journal stops counting them as uncommitted at once, while a balance read just before stays cached for the
TTL (for `max_stale` through an outage): the same charges were in neither, and the payer could be served them
again beyond its escrow, the node's stake covering the shortfall at the next commit."""

from __future__ import annotations

import functools
from pathlib import Path

from web3 import AsyncWeb3

from attribution.chain import Chain
from attribution.deploy import Contracts
from attribution.devchain import free_port
from attribution.ledger import ChainLedger
from attribution.storage import SqliteJournal, State
from node.adapters.ipfs import LocalIpfsNode
from tests.attribution.helpers import World
from tests.attribution.submitting import records, world_submitter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_commit_frees_none_of_its_charges_while_the_old_balance_is_cached(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    clock = Clock()  # stands still until the test moves it: the balance read before the commit stays cached
    ledger = ChainLedger(world.c, ttl=2.0, max_stale=60.0, clock=clock)
    payer, node = world.payer_a.address, world.node.address
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path)
    submitter.on_collected = functools.partial(ledger.collected, node)  # as `open_accounting` wires them
    dead = Chain(AsyncWeb3(AsyncWeb3.AsyncHTTPProvider(f"http://127.0.0.1:{free_port()}")), world.chain.chain_id)

    async def free() -> int:
        return await ledger.escrow_available(payer, node) - await journal.uncommitted_charge(payer)

    async def on_chain() -> int:  # the reference: the account as the chain has it now, less what is uncommitted
        balance, thawing, _ = await world.c.escrow._call("accountOf", payer, node)
        return balance - thawing - await journal.uncommitted_charge(payer)

    try:
        usages = await records(world, journal, 3)
        assert await free() == await on_chain()  # read (and cached) before the commit
        await submitter.commit_next()
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await on_chain() == await free()  # before: higher by the 3 charges
        ledger.contracts = Contracts.attach(dead, world.deployments)  # an outage: the old value stands in
        clock.now += 30.0
        assert await on_chain() == await free()
        assert ledger.stale_reads == 1
        ledger.contracts = world.c
        clock.now += 3.0  # the chain answers again: a value read after the commit is not lowered again
        assert await on_chain() == await free()
        assert sum(u.record.charge for u in usages) > 0
    finally:
        await dead.close()
        await journal.close()
        await chain.close()
