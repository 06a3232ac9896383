"""A client that goes away cancels its engine request: its sequence stops and its KV blocks are freed."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.api.conftest import MODEL, Node, scrape

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TOKENS = 480  # about the whole context: far more than is generated before the client leaves


def long_request(endpoint: str, stream: bool) -> dict:
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream}
    if endpoint == "/v1/chat/completions":
        return {**body, "messages": [{"role": "user", "content": "Hi"}]}
    return {**body, "prompt": "Hi"}


async def wait_running(node: Node) -> None:
    async with asyncio.timeout(10):
        while node.engine.stats()["running"] == 0:
            await asyncio.sleep(0.002)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
async def test_closing_a_stream_aborts_the_request(node: Node, http: aiohttp.ClientSession, endpoint: str):
    before = await scrape(http)
    async with aiohttp.ClientSession(base_url=node.url) as session:
        resp = await session.post(endpoint, json=long_request(endpoint, stream=True))
        assert resp.status == 200
        events = 0
        async for line in resp.content:
            events += line.startswith(b"data: ")
            if events == 3:
                break
        assert node.engine.stats()["kv_blocks_used"] > 0
        resp.close()  # drops the connection mid-stream
    stats = await node.wait_idle()
    assert stats["kv_blocks_used"] == 0
    after = await scrape(http)
    generated = after("openlora_completion_tokens_total", endpoint=endpoint) - before(
        "openlora_completion_tokens_total", endpoint=endpoint
    )
    assert 0 < generated < MAX_TOKENS  # stopped early: aborted, not finished
    assert after("openlora_requests_total", endpoint=endpoint, status="499") == before(
        "openlora_requests_total", endpoint=endpoint, status="499"
    ) + 1


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
async def test_abandoning_a_non_streaming_request_aborts_it(node: Node, http: aiohttp.ClientSession, endpoint: str):
    before = await scrape(http)
    async with aiohttp.ClientSession(base_url=node.url) as session:
        task = asyncio.create_task(session.post(endpoint, json=long_request(endpoint, stream=False)))
        await wait_running(node)
        task.cancel()  # closes the connection before any response byte
        with pytest.raises(asyncio.CancelledError):
            await task
    await node.wait_idle()
    after = await scrape(http)
    generated = after("openlora_completion_tokens_total", endpoint=endpoint) - before(
        "openlora_completion_tokens_total", endpoint=endpoint
    )
    assert generated < MAX_TOKENS


async def test_node_still_serves_after_disconnects(http: aiohttp.ClientSession, node: Node):
    async with http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4}) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] <= 4
    await node.wait_idle()
