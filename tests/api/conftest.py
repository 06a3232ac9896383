"""A real node (the tiny model, the real engine, `create_app`) on a free port, one per test module,
and clients for it: the official `openai` package and raw aiohttp.

Test modules here run in a module-scoped event loop (`pytestmark = pytest.mark.asyncio(loop_scope="module")`)
so that they share the module's server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from node.adapters.manager import AdapterManager
from node.api.app import create_app
from node.api.keys import ADAPTERS, ENGINE
from node.api.server import start_server
from node.config import Settings
from node.engine import AsyncEngine

MODEL = "tiny"
MAX_MODEL_LEN = 512  # the tiny model's max_position_embeddings
MAX_BODY_BYTES = 64 * 1024


@dataclass
class Node:
    app: web.Application
    url: str

    @property
    def engine(self) -> AsyncEngine:
        return self.app[ENGINE]

    @property
    def adapters(self) -> AdapterManager:
        return self.app[ADAPTERS]

    async def wait_idle(self, timeout: float = 10.0) -> dict[str, int]:
        """The engine's stats once nothing runs, waits or holds KV blocks."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            stats = self.engine.stats()
            if stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0:
                return stats
            assert asyncio.get_running_loop().time() < deadline, f"engine still busy: {stats}"
            await asyncio.sleep(0.01)


@asynccontextmanager
async def serve_node(model_dir: Path, **settings) -> AsyncIterator[Node]:
    """A node on a free port, built by `create_app` like the real one, stopped on exit."""
    defaults = dict(
        served_model_name=MODEL,
        max_body_bytes=MAX_BODY_BYTES,
        num_kv_blocks=128,
        kv_block_size=16,
        max_num_seqs=8,
        default_max_tokens=16,
    )
    app = create_app(Settings(model=str(model_dir), port=0, **{**defaults, **settings}))
    runner, url = await start_server(app, "127.0.0.1", 0)
    try:
        yield Node(app, url)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(tiny_model_dir) -> AsyncIterator[Node]:
    async with serve_node(tiny_model_dir) as n:
        yield n


@pytest_asyncio.fixture(loop_scope="module")
async def client(node: Node) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def http(node: Node) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=node.url) as session:
        yield session


def chat_body(content: str = "Hello", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


async def scrape(http: aiohttp.ClientSession) -> Callable[..., float]:
    """GET /metrics; returns `value(sample_name, **labels)` (0.0 when absent)."""
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    return value
