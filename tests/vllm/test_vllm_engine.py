"""The node with vLLM as its engine, on a real local network (anvil, an IPFS node, the contracts), against
the node on our engine as the reference. One vLLM server for the whole module: the network's node starts
and supervises it (`--engine vllm`); the other vLLM-backed nodes here connect to it (`--engine-url`).

SmolLM2-135M-Instruct in float32 (in bf16 the two engines' greedy tokens part after ~20 tokens: rounding).
The crash test runs last: it kills that server and waits for the node to restart it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import torch
from aiohttp import web

from attribution.caps import CapLedger
from attribution.client import OpenLoRAClient
from attribution.errors import NodeRefusedError
from attribution.storage import State
from node.adapters.ipfs import KuboRpcClient, import_directory
from node.adapters.synthetic import make_random_adapter
from node.api.keys import ACCOUNTANT, ENGINE
from node.config import Settings
from node.devnet import LocalNetwork, local_network
from node.vllm.engine import VllmEngine
from tests.adapters.test_ipfs_adapters import REFUSALS, _tamper
from tests.api.conftest import serve_node

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from e2e_devnet import pay_and_settle  # noqa: E402

BASE = "smollm2"
# PEFT adapters of different ranks, targets and scalings (local directories: served free, not paid)
LOCAL_ADAPTERS = {
    "r4-qv": dict(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    "r8-mlp": dict(rank=8, alpha=16, target_modules=("gate_proj", "up_proj", "down_proj")),
    "r16-all": dict(
        rank=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ),
    "r8-rslora": dict(rank=8, alpha=5.5, use_rslora=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
}
COMMON = dict(
    served_model_name=BASE, dtype="float32", max_model_len=1024, num_kv_blocks=256, max_num_seqs=16, max_loras=4,
    host_adapters=8, max_lora_rank=16,
)  # fmt: skip
QUESTIONS = ["What is the capital of France?", "Write a haiku about rivers.", "Name three prime numbers."]


@pytest.fixture(scope="module")
def adapters_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm-adapters")
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for i, (name, spec) in enumerate(LOCAL_ADAPTERS.items()):
        make_random_adapter(smollm2_dir, root / name, seed=100 + i, std=0.03, base_model=base, **spec)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(smollm2_dir, adapters_dir, vllm_python, tmp_path_factory) -> AsyncIterator[LocalNetwork]:
    work = tmp_path_factory.mktemp("vllm-network")
    settings = Settings(
        port=0, model=str(smollm2_dir), cache_dir=work / "cache", engine="vllm", vllm_python=vllm_python,
        adapters_dir=adapters_dir, allow_unsigned=True, **COMMON,
    )  # fmt: skip
    async with local_network(
        settings, work / "devnet", ipfs_repo=work / "ipfs", batch_interval=2.0, batch_max_records=16
    ) as network:
        yield network


def engine(net: LocalNetwork) -> VllmEngine:
    found = net.app[ENGINE]
    assert isinstance(found, VllmEngine)
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ours(net: LocalNetwork, smollm2_dir, adapters_dir, tmp_path_factory):
    """The same node on our engine: the same model, local adapters, IPFS gateway and adapter index."""
    async with serve_node(
        smollm2_dir, cache_dir=tmp_path_factory.mktemp("ours"), adapters_dir=adapters_dir,
        ipfs_gateways=[net.ipfs.gateway_url], adapter_index=net.provisioned.adapter_index, **COMMON,
    ) as node:  # fmt: skip
        yield node


async def chat(url: str, model: str, question: str, max_tokens: int = 24, **fields) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, **fields}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def test_greedy_tokens_equal_ours_for_every_adapter_and_the_base(net: LocalNetwork, ours) -> None:
    """Mixed batches: every model at once on each node (several adapters of different ranks and targets,
    IPFS adapters by name and by CID, the base model), the same text and token counts."""
    models = [BASE, *LOCAL_ADAPTERS, *net.provisioned.adapters, next(iter(net.provisioned.adapters.values()))]
    asks = [(m, QUESTIONS[i % len(QUESTIONS)]) for i, m in enumerate(models)]
    theirs = await asyncio.gather(*(chat(net.url, m, q) for m, q in asks))
    mine = await asyncio.gather(*(chat(ours.url, m, q) for m, q in asks))
    for (model, _), a, b in zip(asks, theirs, mine):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], model
        assert a["usage"] == b["usage"], model
        assert a["usage"]["completion_tokens"] > 0
    texts = {a["choices"][0]["message"]["content"] for a in theirs}
    assert len(texts) >= len(models) - 2  # the adapters change the answers (the CID repeats a name)
    held = engine(net).held_adapters()
    assert set(LOCAL_ADAPTERS) | set(net.provisioned.adapters.values()) <= set(held)  # names and CIDs, by CID


async def test_streamed_answer_is_the_whole_answer(net: LocalNetwork, ours) -> None:
    whole = await chat(net.url, "r16-all", QUESTIONS[0])
    pieces, usage = [], None
    body = {"model": "r16-all", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 24,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{net.url}/v1/chat/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    pieces += [c["delta"].get("content") or "" for c in event.get("choices", [])]
                    usage = event.get("usage") or usage
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert usage == whole["usage"]


async def test_completions_and_stop_strings_as_ours(net: LocalNetwork, ours) -> None:
    async def complete(url: str, **fields) -> dict:
        body = {"model": "r8-mlp", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, **fields}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                return await response.json()

    theirs, mine = await complete(net.url), await complete(ours.url)
    assert theirs["choices"][0]["text"] == mine["choices"][0]["text"] and theirs["usage"] == mine["usage"]
    text = theirs["choices"][0]["text"]
    stop = text.split()[2]  # a word the answer reaches after a couple of tokens
    theirs, mine = await complete(net.url, stop=[stop]), await complete(ours.url, stop=[stop])
    assert theirs["choices"][0]["text"] == mine["choices"][0]["text"] == text[: text.index(stop)]
    assert theirs["choices"][0]["finish_reason"] == mine["choices"][0]["finish_reason"] == "stop"
    assert theirs["usage"] == mine["usage"]  # the same tokens billed


async def test_health_and_metrics_come_from_vllm(net: LocalNetwork) -> None:
    """/metrics shows vLLM's KV cache and prefix-cache counts and the adapters it holds, as for our engine."""
    from tests.api.conftest import scrape

    async with aiohttp.ClientSession(base_url=net.url) as http:
        async with http.get("/health") as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        deadline = time.monotonic() + 30  # vLLM's metrics are read every STATS_INTERVAL_S
        while (value := await scrape(http))("openlora_kv_blocks_total") == 0:
            assert time.monotonic() < deadline, "no KV-cache size from vLLM"
            await asyncio.sleep(1)
    assert value("openlora_prefix_cache_tokens_total", result="miss") > 0  # the prompts served so far
    assert value("openlora_adapters_resident", tier="device") == len(engine(net).held_adapters()) > 0
    assert value("openlora_adapter_loads_total", tier="device") >= len(engine(net).held_adapters())


async def test_signed_requests_are_recorded_and_settle(net: LocalNetwork, tmp_path) -> None:
    """Paid requests served by vLLM, their records verified by the client, committed, finalized and
    distributed, checked independently of the node (scripts/e2e_devnet.py) and audited clean."""
    result = await pay_and_settle(net, 5, 6, tmp_path / "caps.json")
    assert (result["lost"], result["doubled"], result["mismatched"], result["audit"]) == (0, 0, {}, "clean")
    assert result["settled"] == 5 and result["contributors"] > 0


async def publish(net: LocalNetwork, directory: Path) -> str:
    async with KuboRpcClient(net.ipfs.api_url) as client:
        return str(await client.publish(import_directory(directory)))


async def lying_gateway(car: bytes) -> web.AppRunner:
    """A gateway that answers every CID with `car`."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=car, content_type="application/vnd.ipld.car")

    app = web.Application()
    app.router.add_get("/ipfs/{cid}", answer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_adapter_that_fails_verification_never_reaches_vllm(net: LocalNetwork, tmp_path) -> None:
    source = next(iter(LOCAL_ADAPTERS))
    refused = {how: await publish(net, _tamper(Path(net.settings.adapters_dir) / source, tmp_path / how, how))
               for how in REFUSALS}  # fmt: skip
    held_before, loads_before = engine(net).held_adapters(), engine(net).held.loads
    async with aiohttp.ClientSession() as http:
        for how, cid in refused.items():
            body = {"model": cid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            async with http.post(f"{net.url}/v1/chat/completions", json=body) as response:
                error = (await response.json())["error"]
                assert response.status == 400 and error["code"] == "adapter_invalid", (how, error)
    # a gateway that lies about a good adapter's blocks: refused by the block verifier
    good = next(iter(net.provisioned.adapters.values()))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{net.ipfs.gateway_url}/ipfs/{good}?format=car") as response:
            car = bytearray(await response.read())
    car[-5] ^= 0xFF  # a byte inside the last block
    liar = await lying_gateway(bytes(car))
    host, port = liar.addresses[0][:2]
    vllm = engine(net)
    async with serve_node(
        Path(net.settings.model), cache_dir=tmp_path / "liar-node", ipfs_gateways=[f"http://{host}:{port}"],
        engine="vllm", engine_url=vllm.client.url, engine_api_key=vllm.server.api_key, **COMMON,
    ) as node:  # fmt: skip
        async with aiohttp.ClientSession() as http:
            body = {"model": good, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            async with http.post(f"{node.url}/v1/chat/completions", json=body) as response:
                error = (await response.json())["error"]
                assert response.status == 503 and error["code"] == "adapter_unavailable", error
        assert node.engine.held_adapters() == [] and node.engine.held.loads == 0
        assert list((tmp_path / "liar-node" / "vllm-adapters").iterdir()) == []
    await liar.cleanup()
    served = {m["id"] for m in await vllm.client.models()}
    assert not served & set(refused.values())  # vLLM never heard of them
    assert engine(net).held_adapters() == held_before and engine(net).held.loads == loads_before
    assert not any((Path(net.settings.cache_dir) / "vllm-adapters" / cid).exists() for cid in refused.values())


async def test_serve_cli_in_front_of_a_running_vllm(net: LocalNetwork, tmp_path) -> None:
    """`openlora serve --engine vllm --engine-url`: the command an operator with a vLLM of their own runs."""
    vllm = engine(net)
    cmd = [str(ROOT / ".venv" / "bin" / "openlora"), "serve", "--port", "0", "--engine", "vllm",
           "--engine-url", vllm.client.url, "--model", net.settings.model, "--served-model-name", BASE,
           "--cache-dir", str(tmp_path), "--local-ipfs", "false"]  # fmt: skip
    env = {**os.environ, "OPENLORA_ENGINE_API_KEY": vllm.server.api_key}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        while url is None:
            line = await asyncio.to_thread(proc.stderr.readline)
            assert line, "openlora serve exited early"
            if " at http://" in line and "serving" in line:
                url = line.rsplit(" at ", 1)[1].strip()
        answer = await chat(url, BASE, QUESTIONS[0], max_tokens=8)
        assert answer["usage"]["completion_tokens"] == 8 or answer["choices"][0]["finish_reason"] == "stop"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    assert proc.returncode == 0


async def test_vllm_crash_shows_on_health_costs_nothing_and_restart_recovers(net: LocalNetwork, tmp_path) -> None:
    vllm = engine(net)
    accountant = net.app[ACCOUNTANT]
    key = net.provisioned.payer_key.read_text().strip()
    adapter = next(iter(net.provisioned.adapters))
    async with OpenLoRAClient(
        net.url, key, tokenizer=net.settings.model, ledger=CapLedger(tmp_path / "caps.json")
    ) as client:
        await client.chat(adapter, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
        depth = await accountant.journal.depth()
        restarts = vllm.server.restarts
        os.kill(vllm.server.pid, signal.SIGKILL)  # what a crash looks like

        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                async with http.get(f"{net.url}/health") as response:
                    health = await response.json()
                    if response.status == 503:
                        break
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.2)
            assert health["status"] == "engine_stopped"
            with pytest.raises(NodeRefusedError, match="503 engine_unavailable") as refused:
                await client.chat(adapter, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
            assert "is not running; retry shortly" in str(refused.value)
            assert await accountant.journal.depth() == depth  # no record, no charge
            deadline = time.monotonic() + 900
            while True:  # the node restarts its vLLM
                async with http.get(f"{net.url}/health") as response:
                    if response.status == 200:
                        break
                assert time.monotonic() < deadline, "vLLM was not restarted"
                await asyncio.sleep(1)
        assert vllm.server.restarts == restarts + 1
        answer = await client.chat(adapter, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
        assert answer.record.output_tokens > 0  # the adapter is loaded into the new vLLM again, and paid
    paid = await accountant.journal.depth()
    assert sum(paid[s] for s in State if s is not State.FREE) == sum(depth[s] for s in State if s is not State.FREE) + 1
