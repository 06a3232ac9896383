"""The vLLM CPU side of bench_peers.py: vLLM's AsyncLLM (the engine behind its OpenAI server) on
the spec's model and PEFT adapters, fed token ids, greedy, EOS ignored, streaming increments.

Runs in the virtual environment .venv-peers that bench_peers.py creates. Started by it:
    .venv-peers/bin/python scripts/peer_vllm.py SPEC_JSON RESULT_FD
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator

from peerlib import load_spec, serve


async def main(spec: dict, result_fd: int) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    lora = spec["enable_lora"]
    args = AsyncEngineArgs(
        model=spec["model"],
        dtype=spec["dtype"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_prefill_tokens"],
        kv_cache_memory_bytes=spec["kv_cache_bytes"],
        enable_prefix_caching=True,
        enable_lora=lora,
        max_loras=spec["max_loras"] if lora else 1,
        max_cpu_loras=spec["max_loras"] if lora else None,
        max_lora_rank=spec["max_lora_rank"],
    )
    engine = AsyncLLM.from_engine_args(args)
    adapters = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())}
    ids = itertools.count()

    async def one(prompt: list[int], adapter: str | None, max_tokens: int) -> AsyncIterator[list[int]]:
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        lora_request = adapters[adapter] if adapter is not None else None
        prompt_in = TokensPrompt(prompt_token_ids=prompt)
        async for out in engine.generate(prompt_in, sampling, f"bench-{next(ids)}", lora_request=lora_request):
            yield list(out.outputs[0].token_ids)

    try:
        await serve(spec, result_fd, one)
    finally:
        engine.shutdown()


if __name__ == "__main__":  # vLLM starts its engine core and worker as spawned processes
    asyncio.run(main(*load_spec(sys.argv)))
