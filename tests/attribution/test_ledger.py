"""ChainLedger's cache over the real contracts on anvil: reads within the TTL, stale values through an outage
(bounded by max_stale), and errors when nothing recent is known."""

from __future__ import annotations

import pytest

from attribution.chain import Chain
from attribution.deploy import Contracts
from attribution.errors import ChainError
from attribution.ledger import ChainLedger
from tests.attribution.helpers import World


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_ttl_outage_and_staleness(world: World, anvil) -> None:
    clock = Clock()
    chain = await Chain.connect(anvil.rpc_url)
    ledger = ChainLedger(Contracts.attach(chain, world.deployments), ttl=2.0, max_stale=60.0, clock=clock)
    payer, node = world.payer_a.address, world.node.address
    first = await ledger.escrow_available(payer, node)
    await chain.close()  # from here every read of the chain fails
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
