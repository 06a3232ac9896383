"""Fixtures: one anvil per session (owned here, stopped at teardown), the scenario deployed once and
restored from an EVM snapshot before every test."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from attribution.chain import Chain
from attribution.deploy import Contracts, Deployments
from attribution.devchain import Anvil
from node.adapters.ipfs import LocalIpfsNode
from tests.attribution.helpers import World, setup_world


def _rpc(url: str, method: str, params: list[object]) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["result"]


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    with Anvil() as chain:
        yield chain


@pytest.fixture(scope="session")
def scenario(anvil: Anvil) -> tuple[Deployments, list[object]]:
    """The deployed scenario and a one-element list holding its snapshot id."""

    async def setup() -> Deployments:
        chain = await Chain.connect(anvil.rpc_url)
        try:
            return await setup_world(chain, anvil.private_keys)
        finally:
            await chain.close()

    deployments = asyncio.run(setup())
    return deployments, [_rpc(anvil.rpc_url, "evm_snapshot", [])]


@pytest.fixture
def fresh_chain(anvil: Anvil, scenario: tuple[Deployments, list[object]]) -> Iterator[Deployments]:
    """Restores the scenario's snapshot (anvil consumes it, so take a new one) around each test."""
    deployments, snapshot = scenario
    yield deployments
    _rpc(anvil.rpc_url, "evm_revert", [snapshot[0]])
    snapshot[0] = _rpc(anvil.rpc_url, "evm_snapshot", [])


@pytest.fixture
async def world(anvil: Anvil, fresh_chain: Deployments) -> AsyncIterator[World]:
    chain = await Chain.connect(anvil.rpc_url)
    yield World(chain, fresh_chain, Contracts.attach(chain, fresh_chain), anvil.private_keys)
    await chain.close()


@pytest.fixture(scope="session")
def ipfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIpfsNode]:
    """A local IPFS node (the submitter publishes batch files to it)."""
    node = LocalIpfsNode(tmp_path_factory.mktemp("ipfs"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
async def manual_mining(world: World) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Automatic mining off for the test (transactions wait in the pool); yields a function that mines a block."""
    await world.chain.rpc("evm_setAutomine", [False])
    try:
        yield lambda: world.chain.rpc("evm_mine")
    finally:
        await world.chain.rpc("evm_setAutomine", [True])
