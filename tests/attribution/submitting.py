"""What the submitter tests share: a real `Submitter` over a real chain connection, journal and IPFS node (built
the same way in the test process and in `submitter_child`), journals of signed records, and chain probes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from eth_account import Account

from attribution.chain import Chain
from attribution.deploy import Contracts, Deployments
from attribution.fees import FeePolicy
from attribution.storage import SqliteJournal
from attribution.storage.entries import Usage
from attribution.submitter import Submitter
from node.adapters.ipfs import KuboRpcClient, import_file
from tests.attribution.helpers import World


async def submitter_at(
    rpc_url: str, deployments: Deployments, key: str, node: str, ipfs_api_url: str, journal: SqliteJournal,
    batch_dir: Path, fees: FeePolicy | None = None,
) -> tuple[Chain, Submitter]:  # fmt: skip
    """A node's submitter connected to `rpc_url` (10 records a batch, maxCommitDelay 300 s, window 600 s)."""
    chain = await Chain.connect(rpc_url, fees=fees or FeePolicy())

    async def publish(path: Path) -> str:
        dag = await asyncio.to_thread(import_file, path)
        async with KuboRpcClient(ipfs_api_url) as client:
            await client.dag_import(dag.car_chunks())
        return str(dag.root)

    submitter = Submitter(
        journal=journal, contracts=Contracts.attach(chain, deployments), sender=Account.from_key(key), node=node,
        publish=publish, batch_dir=batch_dir, max_records=10, interval=1.0, max_commit_delay=300,
        challenge_window=600,
    )  # fmt: skip
    return chain, submitter


async def world_submitter(
    world: World, ipfs_api_url: str, journal: SqliteJournal, tmp: Path, fees: FeePolicy | None = None,
    rpc_url: str | None = None,
) -> tuple[Chain, Submitter]:  # fmt: skip
    """The scenario node's submitter, on the world's anvil or through `rpc_url`."""
    url = rpc_url or world.chain.w3.provider.endpoint_uri
    key = world.node_signer.key.hex()
    return await submitter_at(url, world.deployments, key, world.node.address, ipfs_api_url, journal,
                              tmp / "batches", fees)  # fmt: skip


async def records(world: World, journal: SqliteJournal, n: int = 3, **leaf: object) -> list[Usage]:
    """`n` signed records of payer A appended to `journal`."""
    usages = []
    for _ in range(n):
        made = await world.leaf(world.payer_a, **leaf)
        usage = Usage(made.request, made.signature, made.record, made.record_signature, "bafy-adapter-one")
        await journal.append(usage)
        usages.append(usage)
    return usages


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def pool_tx(world: World) -> dict:
    """The node's transaction waiting in the pool."""
    pending = await world.chain.w3.eth.get_block("pending", full_transactions=True)
    ours = [tx for tx in pending["transactions"] if tx["from"] == world.node_signer.address]
    assert len(ours) == 1, ours
    return ours[0]


async def has_pool_tx(world: World) -> bool:
    pending = await world.chain.w3.eth.get_block("pending", full_transactions=True)
    return any(tx["from"] == world.node_signer.address for tx in pending["transactions"])


async def commit_logs(world: World, chain: Chain | None = None) -> list:
    """The scenario node's BatchCommitted events (through `chain`'s RPC if given)."""
    settlement = world.c.settlement if chain is None else Contracts.attach(chain, world.deployments).settlement
    event = settlement.contract.events.BatchCommitted
    return await event.get_logs(from_block=0, argument_filters={"node": world.node.address})


async def commits(world: World) -> int:
    return len(await commit_logs(world))
