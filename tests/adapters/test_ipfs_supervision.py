"""The local IPFS node `serve` starts is supervised: killed, it is reaped and restarted on the same
ports (with backoff while it cannot start), /health and /metrics say so meanwhile, and nothing
trusts its endpoints file without asking the node."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from node.adapters.ipfs import LocalIpfsNode
from node.api.keys import LOCAL_IPFS
from tests.api.conftest import scrape, serve_node

from .conftest import chat, publish


async def health(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/health") as resp:
            assert resp.status == 200
            return await resp.json()


async def wait_for(condition, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.1)


async def hold_port(port: int) -> socket.socket:
    """Bind `port` as soon as the killed node's socket is gone (milliseconds; the supervisor looks
    every half second)."""
    async with asyncio.timeout(5):
        while True:
            try:
                return socket.create_server(("127.0.0.1", port))
            except OSError:
                await asyncio.sleep(0.005)


def zombie_or_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "RSDZT"
    except (FileNotFoundError, IndexError):
        return False


async def test_killed_local_ipfs_node_is_reaped_reported_and_restarted(tiny_model_dir, adapter_dir, tmp_path):
    async with serve_node(tiny_model_dir, cache_dir=tmp_path, local_ipfs=True) as node:
        supervisor = node.app[LOCAL_IPFS]
        ipfs = supervisor.node
        api_url, gateway_url = ipfs.api_url, ipfs.gateway_url
        assert (await health(node.url))["ipfs"] == "ok"
        first = await publish(api_url, adapter_dir)
        assert await chat(node.url, first)

        pid = ipfs.pid
        os.kill(pid, signal.SIGKILL)
        api_port = urlsplit(api_url).port
        # Hold its API port, so that the restart fails until we let go: the node is seen down meanwhile.
        blocker = await hold_port(api_port)
        try:
            await wait_for(lambda: _is(node.url, "degraded"))
            assert (await health(node.url))["ipfs"] == "down"
            assert not zombie_or_alive(pid)  # reaped
            assert not (ipfs.repo / "endpoints.json").exists()  # nobody is sent to a dead port
            assert await LocalIpfsNode.running_endpoints(ipfs.repo) is None
            async with aiohttp.ClientSession(base_url=node.url) as http:
                value = await scrape(http)
            assert value("openlora_local_ipfs_up") == 0 and value("openlora_local_ipfs_exits_total") == 1
            await asyncio.sleep(2)  # a failed start or two: backoff, not a busy loop
        finally:
            blocker.close()
        await wait_for(lambda: _is(node.url, "ok"))
        assert (ipfs.api_url, ipfs.gateway_url) == (api_url, gateway_url)  # same ports: same URLs
        async with aiohttp.ClientSession(base_url=node.url) as http:
            value = await scrape(http)
        assert value("openlora_local_ipfs_up") == 1 and value("openlora_local_ipfs_restarts_total") == 1

        # what `openlora adapter publish` does: find the node through its endpoints file, publish to it
        found = await LocalIpfsNode.running_endpoints(ipfs.repo)
        assert found == {"api": api_url, "gateway": gateway_url}
        shutil.copytree(adapter_dir, tmp_path / "second")
        (tmp_path / "second" / "README.md").write_text("a second adapter: another CID\n")
        second = await publish(found["api"], tmp_path / "second")
        assert second != first and await chat(node.url, second)  # an uncached CID, fetched after the restart
    assert not zombie_or_alive(ipfs.pid or 0)


async def _is(url: str, status: str) -> bool:
    return (await health(url))["status"] == status


async def test_endpoints_file_of_a_dead_node_is_not_trusted(tmp_path):
    repo = tmp_path / "repo"
    async with LocalIpfsNode(repo) as node:
        found = await LocalIpfsNode.running_endpoints(repo)
        assert found == {"api": node.api_url, "gateway": node.gateway_url}
        stale = (repo / "endpoints.json").read_text()
    (repo / "endpoints.json").write_text(stale)  # as a killed process leaves it, pid and all
    assert await LocalIpfsNode.running_endpoints(repo) is None
    alive_pid = json.loads(stale) | {"pid": os.getpid()}  # a live process, no node on the port
    (repo / "endpoints.json").write_text(json.dumps(alive_pid))
    assert await LocalIpfsNode.running_endpoints(repo) is None
    (repo / "endpoints.json").write_text("{not json")
    assert await LocalIpfsNode.running_endpoints(repo) is None


@pytest.mark.parametrize("how", ["missing", "garbage"])
async def test_no_endpoints_file(tmp_path, how):
    if how == "garbage":
        (tmp_path / "endpoints.json").write_text(json.dumps({"api": "http://127.0.0.1:9", "gateway": "x", "pid": 1}))
    assert await LocalIpfsNode.running_endpoints(tmp_path) is None
