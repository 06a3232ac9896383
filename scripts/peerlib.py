"""The side of bench_peers.py that runs inside each serving system's own process.

A worker (peer_openlora.py, peer_vllm.py) loads one system as the spec file says, warms it up,
then runs workloads by name as the benchmark asks for them, one name per line on stdin, and
answers each with one JSON line on the result file descriptor:
    {"wall": s, "ttft": [s per request], "tokens": [[token ids] per request]}
Both workers time requests with the same code (`measure`), so the numbers compare. The benchmark
decides the order and what else runs on the machine meanwhile (the noisy neighbour).

Standard library only: the vLLM worker runs in a virtual environment of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable

# one(prompt_token_ids, adapter name or None for the base model, max_tokens) -> new token ids as they come
Generate = Callable[[list[int], str | None, int], AsyncIterator[list[int]]]


async def measure(one: Generate, workload: dict) -> dict:
    """Submit every request of the workload at once; time to first token per request and the wall
    time of the whole run, from the moment the first request was submitted."""
    t0 = time.perf_counter()

    async def timed(prompt: list[int], adapter: str | None) -> tuple[float, list[int]]:
        first, tokens = None, []
        async for new in one(prompt, adapter, workload["max_tokens"]):
            if first is None and new:
                first = time.perf_counter() - t0
            tokens.extend(new)
        return first, tokens

    done = await asyncio.gather(*map(timed, workload["prompts"], workload["adapters"]))
    wall = time.perf_counter() - t0
    if any(len(tokens) != workload["max_tokens"] for _, tokens in done):
        raise RuntimeError(f"expected exactly {workload['max_tokens']} tokens per request (EOS ignored)")
    return {"wall": wall, "ttft": [f for f, _ in done], "tokens": [t for _, t in done]}


async def serve(spec: dict, result_fd: int, one: Generate) -> None:
    """Warm up, say ready, then run the workloads asked for on stdin until it closes."""
    out = os.fdopen(result_fd, "w", buffering=1)
    await measure(one, spec["warmup"])
    out.write(json.dumps({"ready": True}) + "\n")
    loop = asyncio.get_running_loop()
    while name := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        out.write(json.dumps(await measure(one, spec["workloads"][name])) + "\n")


def load_spec(argv: list[str]) -> tuple[dict, int]:
    """A worker's arguments: the spec file written by bench_peers.py and the result fd."""
    if len(argv) != 3:
        raise SystemExit(f"usage: {argv[0]} SPEC_JSON RESULT_FD  (started by scripts/bench_peers.py)")
    with open(argv[1]) as f:
        return json.load(f), int(argv[2])
