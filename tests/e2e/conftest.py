"""A whole local network per test module: anvil, a real IPFS node, the contracts provisioned with a staked
node, a funded payer and demo adapters (for the tiny test model), and the node serving signed requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from node.config import Settings
from node.devnet import LocalNetwork, local_network


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tiny_model_dir: Path, tmp_path_factory) -> AsyncIterator[LocalNetwork]:
    work = tmp_path_factory.mktemp("network")
    settings = Settings(
        port=0, model=str(tiny_model_dir), served_model_name="tiny", cache_dir=work / "cache", num_kv_blocks=256,
        max_loras=4, dtype="float32",
    )  # fmt: skip
    async with local_network(settings, work / "devnet", ipfs_repo=work / "ipfs", batch_interval=300.0) as network:
        yield network
