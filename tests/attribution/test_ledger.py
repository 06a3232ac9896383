"""ChainLedger's cache over the real contracts on anvil: reads within the TTL, stale values through an outage
(bounded by max_stale), and errors when nothing recent is known."""

from __future__ import annotations

import pytest
from web3 import AsyncWeb3

from attribution.chain import Chain
from attribution.deploy import Contracts
from attribution.devchain import free_port
from attribution.errors import ChainError
from attribution.ledger import ChainLedger
from tests.attribution.helpers import CONFIG, World, claim


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_ttl_outage_and_staleness(world: World) -> None:
    clock = Clock()
    ledger = ChainLedger(world.c, ttl=2.0, max_stale=60.0, clock=clock)
    payer, node = world.payer_a.address, world.node.address
    first = await ledger.escrow_available(payer, node)
    assert first > 0
    # From here the ledger talks to a port where no chain listens: every read fails.
    dead = Chain(AsyncWeb3(AsyncWeb3.AsyncHTTPProvider(f"http://127.0.0.1:{free_port()}")), world.chain.chain_id)
    ledger.contracts = Contracts.attach(dead, world.deployments)
    clock.now += 1.0
    assert await ledger.escrow_available(payer, node) == first  # within the TTL: no read at all
    clock.now += 30.0
    assert await ledger.escrow_available(payer, node) == first  # outage: the recent value stands in
    assert ledger.stale_reads == 1
    clock.now += 30.0  # now 61 s old: too stale to trust
    with pytest.raises(ChainError):
        await ledger.escrow_available(payer, node)
    with pytest.raises(ChainError):  # never read: nothing to fall back on
        await ledger.escrow_available(world.payer_b.address, node)
    await dead.close()


async def test_cache_at_its_bound_drops_the_least_recently_used(world: World) -> None:
    """Past `max_entries` the least recently used entry goes, one at a time: a payer whose escrow was read
    first but used since keeps its value (it answers through an outage); an entry left unused goes."""
    clock = Clock()
    ledger = ChainLedger(world.c, ttl=2.0, max_stale=60.0, max_entries=4, clock=clock)
    node = world.node.address
    honest = await ledger.escrow_available(world.payer_a.address, node)
    await ledger.escrow_available(world.payer_b.address, node)
    await ledger.adapter_id_by_name("flood-0")
    await ledger.adapter_id_by_name("flood-1")  # 4 entries: at the bound, none dropped
    clock.now += 1.0
    assert await ledger.escrow_available(world.payer_a.address, node) == honest  # a hit: now the most recent
    await ledger.adapter_id_by_name("flood-2")  # 5 > 4: payer_b's entry, the least recently used, goes
    await ledger.adapter_id_by_name("flood-3")  # then flood-0's
    dead = Chain(AsyncWeb3(AsyncWeb3.AsyncHTTPProvider(f"http://127.0.0.1:{free_port()}")), world.chain.chain_id)
    ledger.contracts = Contracts.attach(dead, world.deployments)
    clock.now += 10.0  # past the TTL, within max_stale: what is still cached answers, the rest cannot
    assert await ledger.escrow_available(world.payer_a.address, node) == honest
    for name in ("flood-1", "flood-2", "flood-3"):
        assert await ledger.adapter_id_by_name(name) == 0
    assert ledger.stale_reads == 4
    with pytest.raises(ChainError):
        await ledger.escrow_available(world.payer_b.address, node)
    with pytest.raises(ChainError):
        await ledger.adapter_id_by_name("flood-0")
    await dead.close()


async def test_registry_names_and_ids_follow_the_chain_after_the_ttl(world: World) -> None:
    """What the node's registry adapter source reads: a name's adapter and an adapter's CID, cached for `ttl`;
    a name moved to a new version is followed once the TTL has passed, a retirement once it is in force."""
    clock = Clock()
    ledger = ChainLedger(world.c, ttl=2.0, clock=clock)
    a, owner = world.c.adapters, world.owner
    now = await world.chain.timestamp()
    await claim(world, owner, "demo", 1)
    assert await ledger.adapter_id_by_name("demo") == 1
    assert await ledger.registered_cid(1, now) == "bafy-adapter-one"
    assert await ledger.adapter_id_by_name("nobody") == 0
    assert await ledger.registered_cid(99, now) is None  # no such adapter: None, not a revert
    await a.set_name(owner, "demo", 2)  # a new version of "demo"
    clock.now += 1.9
    assert await ledger.adapter_id_by_name("demo") == 1  # within the TTL: the cached answer
    clock.now += 0.2
    assert await ledger.adapter_id_by_name("demo") == 2
    assert await ledger.registered_cid(2, now) == "bafy-adapter-two"
    receipt = await a.retire(owner, 2)
    since = a.events(receipt, "AdapterRetired")[0]["since"]
    assert since >= now + CONFIG.notice_period
    clock.now += 2.1
    assert await ledger.registered_cid(2, since - 1) == "bafy-adapter-two"  # announced, not in force yet
    assert await ledger.registered_cid(2, since) is None
