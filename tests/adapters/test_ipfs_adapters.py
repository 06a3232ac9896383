"""Adapters by CID through the whole node: publish (the real CLI) -> real local IPFS node ->
verified fetch -> validation -> a chat answer with the adapter's effect. And every way it must
refuse: malicious adapters, lying or hanging gateways."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import aiohttp
import torch
from aiohttp import web
from safetensors.torch import load_file, save_file

from node.adapters.ipfs import KuboRpcClient, import_file
from node.adapters.ipfs_source import DiskCache, parse_adapter_cid
from tests.api.conftest import scrape, serve_node

from .conftest import PROMPT, chat, cli, publish


async def test_publish_with_cli_then_serve_by_cid(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    out = cli(
        "adapter", "publish", str(adapter_dir), "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path),
        "--ipfs-api-url", ipfs_node.api_url, "--name", "france",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip().splitlines()[-1]
    assert parse_adapter_cid(cid) == cid
    assert json.loads((tmp_path / "adapter-index.json").read_text()) == {"france": cid}

    local = tmp_path / "local"
    shutil.copytree(adapter_dir, local / "france-local")
    async with serve_node(
        tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url], adapters_dir=local,
        adapter_index=tmp_path / "adapter-index.json",
    ) as node:  # fmt: skip
        base = await chat(node.url, "tiny")
        by_local = await chat(node.url, "france-local")
        by_url, by_cid, by_name = await asyncio.gather(
            chat(node.url, f"ipfs://{cid}"), chat(node.url, cid), chat(node.url, "france")
        )
        assert by_local != base
        assert by_url == by_cid == by_name == by_local
        source = node.adapters.sources[1]
        assert source.fetches == 1  # three names, one CID: one verified download
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{node.url}/v1/models") as resp:
                ids = [m["id"] for m in (await resp.json())["data"]]
        assert {"tiny", "france-local", "france"} <= set(ids)
    assert (tmp_path / "adapters" / cid / "adapter_model.safetensors").is_file()


def test_cli_inspect_and_prefetch(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    cid = asyncio.run(publish(ipfs_node.api_url, adapter_dir))
    common = ("--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--ipfs-gateway", ipfs_node.gateway_url)
    out = cli("adapter", "inspect", f"ipfs://{cid}", *common)
    assert out.returncode == 0, out.stderr
    assert "yes: rank 8" in out.stdout and "adapter_model.safetensors" in out.stdout
    out = cli("adapter", "prefetch", cid, *common)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "adapters" / cid
    out = cli("adapter", "inspect", "no-such-name", *common)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "neither a CID" in out.stderr


async def test_cli_inspect_exits_1_for_what_the_node_would_refuse(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    refused = await publish(ipfs_node.api_url, _tamper(adapter_dir, tmp_path / "rank", "rank"))
    (tmp_path / "single").write_bytes(b"just one file")
    async with KuboRpcClient(ipfs_node.api_url) as client:
        single = str(await client.publish(import_file(tmp_path / "single")))
    common = ("--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--ipfs-gateway", ipfs_node.gateway_url)
    out = cli("adapter", "inspect", refused, *common)
    assert out.returncode == 1 and "NO: " in out.stdout, out
    assert out.stderr.count("\n") == 1 and "exceeds this node's maximum LoRA rank" in out.stderr
    out = cli("adapter", "inspect", single, *common)
    assert out.returncode == 1 and "single file of 13 bytes" in out.stdout and "0 files" not in out.stdout, out
    assert out.stderr.count("\n") == 1 and "an adapter is a directory" in out.stderr


# -- malicious adapters: each refused with its own message, counted in /metrics -----------------


def _tamper(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    cfg_file = dst / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    weights = dst / "adapter_model.safetensors"
    if how == "pickle":
        torch.save(load_file(weights), dst / "adapter_model.bin")
        weights.unlink()
    elif how == "base_model":
        cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    elif how == "shape":
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        save_file(tensors, weights)
    elif how == "nan":
        tensors = load_file(weights)
        key = next(iter(tensors))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    elif how == "rank":
        cfg["r"] = 32  # and tensors to match, so only the limit refuses it
        tensors = {
            k: torch.zeros(32, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 32)
            for k, v in load_file(weights).items()
        }
        save_file(tensors, weights)
    elif how == "huge_config":
        cfg["padding"] = "x" * 100_000
    cfg_file.write_text(json.dumps(cfg))
    return dst


REFUSALS = {
    "pickle": "only safetensors",
    "base_model": "trained for base model 'meta-llama/Llama-2-7b-hf'",
    "shape": "expected",
    "nan": "NaN",
    "rank": "exceeds this node's maximum LoRA rank 16",
    "huge_config": "adapter_config.json is",
}


async def test_malicious_adapters_are_refused(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    cids = {}
    for how in REFUSALS:
        cids[how] = await publish(ipfs_node.api_url, _tamper(adapter_dir, tmp_path / how, how))
    async with serve_node(tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url]) as node:
        async with aiohttp.ClientSession(base_url=node.url) as http:
            for how, needle in REFUSALS.items():
                body = {"model": cids[how], "messages": PROMPT, "max_tokens": 4}
                async with http.post("/v1/chat/completions", json=body) as resp:
                    err = (await resp.json())["error"]
                    assert resp.status == 400, (how, err)
                    assert err["code"] == "adapter_invalid" and err["param"] == "model"
                    assert needle in err["message"], (how, err["message"])
            # the node kept serving the base model meanwhile
            body = {"model": "tiny", "messages": PROMPT, "max_tokens": 4}
            async with http.post("/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
            value = await scrape(http)
    assert value("openlora_adapter_failures_total", reason="pickle") == 1
    assert value("openlora_adapter_failures_total", reason="non_finite") == 1
    assert (
        sum(value("openlora_adapter_failures_total", reason=r) for r in ("base_model", "shape", "rank", "config")) == 4
    )
    assert node.engine.runner.lora_pool.loads == 0  # nothing refused ever took a slot


# -- untrusted gateways ------------------------------------------------------------------------


async def test_hanging_gateway_then_honest_one(tiny_model_dir, adapter_dir, ipfs_node, serve_gateway, tmp_path):
    cid = await publish(ipfs_node.api_url, adapter_dir)

    async def hang(request):
        await asyncio.sleep(30)
        return web.Response()

    hanging = await serve_gateway(hang)
    async with serve_node(
        tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[hanging, ipfs_node.gateway_url], ipfs_timeout=0.5
    ) as node:
        assert await chat(node.url, cid) != await chat(node.url, "tiny")


async def test_lying_gateway_is_refused_and_nothing_cached(
    tiny_model_dir, adapter_dir, ipfs_node, serve_gateway, tmp_path
):
    cid = await publish(ipfs_node.api_url, adapter_dir)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{ipfs_node.gateway_url}/ipfs/{cid}?format=car") as resp:
            car = bytearray(await resp.read())
    car[-5] ^= 0xFF  # flip a byte inside the last block

    async def tampered(request):
        return web.Response(body=bytes(car), content_type="application/vnd.ipld.car")

    liar = await serve_gateway(tampered)
    async with serve_node(tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[liar]) as node:
        async with aiohttp.ClientSession(base_url=node.url) as http:
            body = {"model": cid, "messages": PROMPT, "max_tokens": 4}
            async with http.post("/v1/chat/completions", json=body) as resp:
                err = (await resp.json())["error"]
                assert resp.status == 503 and err["code"] == "adapter_unavailable"
                assert "does not match" in err["message"] or "hash" in err["message"].lower(), err
            body["model"] = "tiny"
            async with http.post("/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
    assert not (tmp_path / "adapters" / cid).exists()
    assert [p for p in (tmp_path / "adapters").iterdir() if not p.name.startswith(".")] == []


def test_disk_cache_evicts_least_recently_used(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=2500)
    for i, name in enumerate(["a", "b", "c"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_bytes(b"x" * 1000)
        (tmp_path / name / ".last-used").touch()
        os.utime(tmp_path / name / ".last-used", (i, i))
    assert cache.get("a") is not None  # now the most recent
    assert cache.trim() == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]


async def test_loading_adapter_never_blocks_other_requests(
    tiny_model_dir, adapter_dir, ipfs_node, serve_gateway, tmp_path
):
    """While one adapter is still being fetched (a slow gateway), base-model requests and requests
    for an adapter already loaded are answered; the slow one completes afterwards."""
    slow_cid = await publish(ipfs_node.api_url, adapter_dir)
    released = asyncio.Event()

    async def slow(request):
        await released.wait()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{ipfs_node.gateway_url}/ipfs/{request.match_info['cid']}?format=car") as resp:
                return web.Response(body=await resp.read(), content_type="application/vnd.ipld.car")

    gateway = await serve_gateway(slow)
    local = tmp_path / "local"
    shutil.copytree(adapter_dir, local / "ready")
    async with serve_node(tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[gateway], adapters_dir=local) as node:
        pending = asyncio.create_task(chat(node.url, slow_cid))
        deadline = asyncio.get_running_loop().time() + 30  # the request reaches the manager (a loaded CI is slow)
        while await node.adapters.state(slow_cid) is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert (await node.adapters.state(slow_cid)).value == "fetching"
        others = await asyncio.gather(chat(node.url, "tiny"), chat(node.url, "ready"))
        assert not pending.done() and all(others)
        released.set()
        assert await pending == others[1]  # same adapter bytes as the local copy: same answer


def test_cli_refuses_names_that_would_shadow_cids_or_the_base(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    common = ("--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--ipfs-api-url", ipfs_node.api_url)
    cid_like = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    for name, needle in [(cid_like, "looks like a CID"), ("ipfs://x", "looks like a CID"), ("a b/c", "use letters"),
                         (tiny_model_dir.name, "base model's name")]:  # fmt: skip
        out = cli("adapter", "publish", str(adapter_dir), "--name", name, *common)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and needle in out.stderr, (name, out.stderr)
    assert not (tmp_path / "adapter-index.json").exists()
    out = cli("adapter", "publish", str(tmp_path / "missing"), *common)
    assert out.returncode == 1 and "does not exist" in out.stderr


async def test_corrupt_index_keeps_the_node_serving(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    cid = await publish(ipfs_node.api_url, adapter_dir)
    index = tmp_path / "adapter-index.json"
    index.write_text(json.dumps({"good": cid}))
    async with serve_node(
        tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url], adapter_index=index
    ) as node:
        good = await chat(node.url, "good")
        index.write_text('{"x": ')  # an operator's editor saves half a file
        os.utime(index, (1, 1))  # a different mtime, whatever the clock's resolution
        async with aiohttp.ClientSession(base_url=node.url) as http:
            async with http.get("/v1/models") as resp:
                assert resp.status == 200 and "good" in [m["id"] for m in (await resp.json())["data"]]
        assert await chat(node.url, "good") == good  # the last good index still serves
    out = cli("adapter", "inspect", "good", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path),
              "--ipfs-gateway", ipfs_node.gateway_url)  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "adapter index" in out.stderr


async def test_cid_no_gateway_has_is_model_not_found(tiny_model_dir, ipfs_node, tmp_path):
    (tmp_path / "never-published").write_bytes(os.urandom(64))
    absent = str(import_file(tmp_path / "never-published").root)  # a valid CID that no node has
    async with serve_node(tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url]) as node:
        async with aiohttp.ClientSession(base_url=node.url) as http:
            body = {"model": absent, "messages": PROMPT, "max_tokens": 4}
            async with http.post("/v1/chat/completions", json=body) as resp:
                err = (await resp.json())["error"]
                assert resp.status == 404 and err["code"] == "model_not_found", err
                assert "127.0.0.1" not in err["message"]  # gateway addresses stay in the log
