"""The node on each engine, and what the node costs in front of vLLM (issue 13).

The same mixed-adapter chat workload (N requests round-robin over K rank-8 q/k/v/o PEFT adapters and
the base model, greedy, EOS ignored: exactly M new tokens each, every request sent at once, streamed)
through:
  openlora     `openlora serve` on our engine
  node+vLLM    `openlora serve --engine vllm --engine-url` in front of a vLLM server
  vLLM alone   the same vLLM server, asked directly (the adapters the node loaded into it, by name)
Tokens/s over the whole run and time to first token (p50/p95 over requests), medians over repeats.
The two vLLM rows share one server and alternate, so that drift in the machine's load hits both
alike; our engine runs while no vLLM runs. Every system is a process of its own; this script only
sends requests. Last line:
    RESULT node_overhead_vs_vllm=<1 - node+vLLM tokens/s / vLLM alone tokens/s>   (target <= 0.05)

vLLM runs from its own environment, `.venv-peers/` (node/vllm/environment.py creates it on first use).

    .venv/bin/python scripts/bench_engines.py [--quick] [--repeats N] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from bench_peers import cpu_label
from benchlib import QUESTIONS
from transformers import AutoModelForCausalLM

from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine.async_engine import resolve_dtype
from node.engine.prepare import prepare_model
from node.threads import run_in_fresh_thread
from node.vllm.environment import ensure_environment
from node.vllm.options import server_args
from node.vllm.server import VllmServer

ROOT = Path(__file__).resolve().parent.parent
OPENLORA = ROOT / ".venv" / "bin" / "openlora"
SERVED = "smollm2"


@dataclass(frozen=True)
class Sizes:
    requests: int
    adapters: int
    new_tokens: int
    repeats: int


FULL, QUICK = Sizes(32, 8, 64, 3), Sizes(8, 4, 16, 1)


@dataclass
class Run:
    tok_s: float
    ttft_p50: float
    ttft_p95: float


def bodies(sz: Sizes, adapters: list[str]) -> list[dict]:
    """The workload: chat requests over the adapters and the base model, round-robin."""
    models = [*adapters, SERVED]
    return [
        {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}],
            "max_tokens": sz.new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(sz.requests)
    ]


async def measure(url: str, requests: list[dict], headers: dict[str, str] | None = None) -> Run:
    """Send every request at once and stream the answers: tokens/s of the run, TTFT per request."""
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=3600)) as http:
        t0 = time.perf_counter()

        async def one(body: dict) -> tuple[float, int]:
            first, tokens = None, 0
            async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    raise SystemExit(f"error: {url} answered {response.status}: {await response.text()}")
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                        first = time.perf_counter() - t0
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            return first, tokens

        done = await asyncio.gather(*map(one, requests))
        wall = time.perf_counter() - t0
    if any(tokens != body["max_tokens"] for (_, tokens), body in zip(done, requests)):
        raise SystemExit(f"error: {url} did not give exactly max_tokens tokens per request (EOS ignored)")
    ttft = sorted(first for first, _ in done)
    return Run(sum(t for _, t in done) / wall, statistics.median(ttft), ttft[max(0, round(0.95 * len(ttft)) - 1)])


@contextlib.contextmanager
def node_process(args: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> Iterator[str]:
    """`openlora serve --port 0 ARGS` until it says where it serves (after its warm-up); its URL."""
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-engines-node-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(OPENLORA), "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keeps reading, so that a chatty log never fills the pipe
        for line in proc.stderr:
            log.write(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            if line is None:
                log.flush()
                raise SystemExit(f"error: openlora serve exited early; its log: {log.name}")
            if match := re.search(r"serving \S+ at (http://\S+)", line):
                break
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in ("tok_s", "ttft_p50", "ttft_p95")))


async def bench(dtype: str, sz: Sizes) -> dict[str, list[Run]]:
    vllm_python = await asyncio.to_thread(ensure_environment, ROOT / ".venv-peers")
    base_dir = prepare_model(Settings())
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    names = [f"bench-{i:02d}" for i in range(sz.adapters)]

    def write_adapters() -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        for i, name in enumerate(names):
            make_random_adapter(base_dir, work / "adapters" / name, rank=8, seed=1000 + i, std=0.02, base_model=base)

    run_in_fresh_thread(write_adapters)
    settings = Settings(
        model=str(base_dir), served_model_name=SERVED, dtype=dtype, adapters_dir=work / "adapters",
        max_num_seqs=sz.requests, max_loras=sz.adapters, host_adapters=sz.adapters, max_lora_rank=8,
        num_kv_blocks=2048, cache_dir=work / "cache",
    )  # fmt: skip
    flags = [
        "--model", str(base_dir), "--served-model-name", SERVED, "--dtype", dtype, "--adapters", str(work / "adapters"),
        "--max-num-seqs", str(sz.requests), "--max-loras", str(sz.adapters), "--host-adapters", str(sz.adapters),
        "--max-lora-rank", "8", "--cache-dir", str(work / "cache"), "--local-ipfs", "false",
    ]  # fmt: skip
    requests = bodies(sz, names)
    warmup = bodies(Sizes(sz.adapters + 1, sz.adapters, 4, 1), names)  # every adapter once
    runs: dict[str, list[Run]] = {}
    print("openlora: starting the node on our engine ...", flush=True)
    with node_process(flags) as url:
        await measure(url, warmup)
        for rep in range(sz.repeats):
            print(f"repeat {rep + 1}/{sz.repeats}: openlora", flush=True)
            runs.setdefault("openlora", []).append(await measure(url, requests))
    print("vLLM: starting its server ...", flush=True)
    server = VllmServer(
        vllm_python, server_args(settings, base_dir, SERVED, dtype, lora=True), work / "vllm-server.log",
        start_timeout=1800,
    )  # fmt: skip
    await server.start()
    try:
        env = {"OPENLORA_ENGINE_API_KEY": server.api_key}
        with node_process([*flags, "--engine", "vllm", "--engine-url", server.url], env) as url:
            await measure(url, warmup)  # the node loads every adapter into vLLM, under its name
            alone = {"Authorization": f"Bearer {server.api_key}"}
            for rep in range(sz.repeats):
                order = [("vllm", server.url, alone), ("node+vllm", url, None)]
                for system, target, headers in order if rep % 2 == 0 else order[::-1]:
                    print(f"repeat {rep + 1}/{sz.repeats}: {system}", flush=True)
                    runs.setdefault(system, []).append(await measure(target, requests, headers))
    finally:
        await server.stop()
    return runs


def report(runs: dict[str, list[Run]], header: str) -> None:
    alone = median(runs["vllm"])
    print(f"\n{header}")
    print(f"{'system':<12}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'/ vLLM alone':>14}")
    for system, label in (("openlora", "openlora"), ("node+vllm", "node+vLLM"), ("vllm", "vLLM alone")):
        r = median(runs[system])
        print(f"{label:<12}{r.tok_s:>10.1f}{r.ttft_p50:>9.2f}s{r.ttft_p95:>9.2f}s{r.tok_s / alone.tok_s:>14.2f}")
    overhead = 1 - median(runs["node+vllm"]).tok_s / alone.tok_s
    print(f"RESULT node_overhead_vs_vllm={overhead:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.requests} requests x {QUICK.new_tokens} tokens, once")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 (1 with --quick)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where native), float32, bfloat16")
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    if args.repeats:
        sz = Sizes(sz.requests, sz.adapters, sz.new_tokens, args.repeats)
    dtype = str(resolve_dtype(Settings(dtype=args.dtype))).removeprefix("torch.")
    runs = asyncio.run(bench(dtype, sz))
    report(
        runs,
        f"{cpu_label()}\nSmolLM2-135M-Instruct, {dtype}, {sz.requests} chat requests x {sz.new_tokens} tokens "
        f"over {sz.adapters} rank-8 q/k/v/o adapters + the base model, greedy, all at once, median of {sz.repeats}",
    )


if __name__ == "__main__":
    sys.exit(main())
