"""The public lookup bucket (`node/api/lookups.py`) against content-addressed names on a real IPFS node: what a
lookup costs the node (a fetch, a load) is what draws tokens, on GET /v1/models/<name> and on free generation
requests alike. The bucket's clock stands still in these tests (a loaded machine must not refill a token)."""

from __future__ import annotations

import os

import aiohttp

from node.adapters.ipfs import import_file
from node.adapters.synthetic import make_random_adapter
from node.api.keys import LOOKUPS
from tests.api.conftest import serve_node

from .conftest import PROMPT, publish


def _freeze(node) -> None:
    limiter = node.app[LOOKUPS]
    now = limiter.clock()
    limiter.clock = lambda: now


async def _status(http: aiohttp.ClientSession, method: str, path: str, **kwargs) -> int:
    async with http.request(method, path, **kwargs) as resp:
        await resp.read()
        return resp.status


async def test_lookups_of_more_adapters_than_host_memory_holds_draw_tokens(
    tiny_model_dir, adapter_dir, ipfs_node, tmp_path
):
    """Two adapters, host memory for one: each lookup of one evicts the other, so each costs a load. Answered a
    moment ago or not, every such lookup draws a token (1/s, burst 4): the fifth is refused. Before, a name
    answered lately drew nothing, and alternating the two reloaded an adapter on every request, unbounded."""
    other = make_random_adapter(tiny_model_dir, tmp_path / "other", rank=8, seed=4, std=0.2)
    cids = [await publish(ipfs_node.api_url, adapter_dir), await publish(ipfs_node.api_url, other)]
    async with serve_node(
        tiny_model_dir, cache_dir=tmp_path / "cache", ipfs_gateways=[ipfs_node.gateway_url], host_adapters=1,
        model_lookups_per_s=1,
    ) as node:  # fmt: skip
        _freeze(node)
        async with aiohttp.ClientSession(base_url=node.url) as http:
            statuses = [await _status(http, "GET", f"/v1/models/{cids[i % 2]}") for i in range(5)]
            assert statuses == [200, 200, 200, 200, 429]
            assert node.adapters.loads == 4
            for _ in range(3):  # the one in host memory, answered lately: free
                assert await _status(http, "GET", f"/v1/models/{cids[1]}") == 200
            node.adapters.release(await node.adapters.acquire(cids[0]))  # the other one is held now
            assert await _status(http, "GET", f"/v1/models/{cids[0]}") == 200
            assert await _status(http, "GET", f"/v1/models/{cids[1]}") == 429  # evicted: it would reload
            assert node.adapters.loads == 5


async def test_free_generation_requests_draw_from_the_lookup_bucket(tiny_model_dir, ipfs_node, tmp_path):
    """An unsigned request served free resolves and fetches the name it asks for just as GET /v1/models/<name>
    does: fresh CIDs draw from the same bucket. Before, POST /v1/chat/completions fetched any number of them."""
    absent = []
    for i in range(5):
        (tmp_path / f"never-published-{i}").write_bytes(os.urandom(64))
        absent.append(str(import_file(tmp_path / f"never-published-{i}").root))  # valid CIDs no node has
    async with serve_node(
        tiny_model_dir, cache_dir=tmp_path / "cache", ipfs_gateways=[ipfs_node.gateway_url], model_lookups_per_s=1
    ) as node:
        _freeze(node)
        async with aiohttp.ClientSession(base_url=node.url) as http:
            statuses = []
            for cid in absent:
                body = {"model": cid, "messages": PROMPT, "max_tokens": 4}
                statuses.append(await _status(http, "POST", "/v1/chat/completions", json=body))
            assert statuses == [404, 404, 404, 404, 429]
            body = {"model": "tiny", "messages": PROMPT, "max_tokens": 4}
            assert await _status(http, "POST", "/v1/chat/completions", json=body) == 200  # the base model: never


async def test_adapters_on_local_disk_never_draw(tiny_model_dir, tmp_path):
    """The operator's own adapters cost no network: a node with the bucket empty still serves them."""
    local = tmp_path / "local"
    make_random_adapter(tiny_model_dir, local / "mine", rank=8, seed=5, std=0.2)
    async with serve_node(tiny_model_dir, adapters_dir=str(local), model_lookups_per_s=0.25) as node:  # burst 1
        _freeze(node)
        async with aiohttp.ClientSession(base_url=node.url) as http:
            for _ in range(5):
                assert await _status(http, "GET", "/v1/models/mine") == 200
                body = {"model": "mine", "messages": PROMPT, "max_tokens": 2}
                assert await _status(http, "POST", "/v1/chat/completions", json=body) == 200
