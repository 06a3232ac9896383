"""Our engine's side of bench_peers.py: the node's AsyncEngine on the spec's model and PEFT
adapters (a local adapter directory), fed token ids, greedy, EOS ignored, streaming increments.

Started by bench_peers.py, in the project's .venv:
    .venv/bin/python scripts/peer_openlora.py SPEC_JSON RESULT_FD
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator

from benchlib import running
from peerlib import load_spec, serve

from node.config import Settings
from node.engine import GenerationRequest, SamplingParams
from node.serving import load_engine


async def main(spec: dict, result_fd: int) -> None:
    settings = Settings(
        model=spec["model"],
        dtype=spec["dtype"],
        max_num_seqs=spec["max_num_seqs"],
        max_prefill_tokens=spec["max_prefill_tokens"],
        num_kv_blocks=spec["kv_cache_tokens"] // Settings().kv_block_size,
        adapters_dir=spec["adapters_dir"],
        max_loras=spec["max_loras"],
        host_adapters=spec["max_loras"],
        max_lora_rank=spec["max_lora_rank"],
    )
    engine = load_engine(settings)
    ids = itertools.count()

    async def one(prompt: list[int], adapter: str | None, max_tokens: int) -> AsyncIterator[list[int]]:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"bench-{next(ids)}", prompt, sampling, adapter)):
            yield out.token_ids

    async with running(engine):
        await serve(spec, result_fd, one)


if __name__ == "__main__":
    asyncio.run(main(*load_spec(sys.argv)))
