"""What the engine benchmarks share: serving a set of requests at once, and left-padded batches
for transformers' `generate` (the peer they are measured against)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

import torch

from node.engine import AsyncEngine, GenerationRequest, SamplingParams

_ids = itertools.count()


@dataclass
class Served:
    tokens: int
    first_token_s: float  # from the start of the run
    done_s: float


@contextlib.asynccontextmanager
async def running(engine: AsyncEngine):
    """The engine thread for the block, stopped after it: a peer measured between such blocks
    has the machine to itself (node/threads.py: a second OpenMP pool slows both sides)."""
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def serve_all(
    engine: AsyncEngine, prompts: list[list[int]], max_tokens: list[int], models: list[str | None]
) -> tuple[list[Served], float]:
    """Submit every request at once (greedy, EOS ignored: exactly max_tokens each); per-request
    timings and the wall time of the whole run."""
    t0 = time.perf_counter()

    async def one(prompt: list[int], n_max: int, model: str | None) -> Served:
        first, n = None, 0
        sp = SamplingParams(max_tokens=n_max, temperature=0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"bench-{next(_ids)}", prompt, sp, model)):
            if first is None and out.token_ids:
                first = time.perf_counter() - t0
            n = out.completion_tokens
        return Served(n, first, time.perf_counter() - t0)

    served = await asyncio.gather(*map(one, prompts, max_tokens, models))
    assert [s.tokens for s in served] == list(max_tokens)
    return served, time.perf_counter() - t0


async def tokens_per_s(
    engine: AsyncEngine, prompts: list[list[int]], models: list[str | None], new_tokens: int
) -> float:
    served, wall = await serve_all(engine, prompts, [new_tokens] * len(prompts), models)
    return sum(s.tokens for s in served) / wall


QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I sort a list in Python?",
    "What is a LoRA adapter?",
]


def chat_prompts(tokenizer, n: int, system: str | None = None) -> list[list[int]]:
    """n chat requests (token ids, generation prompt added), each question made distinct by its number;
    with `system`, every request starts with that system message."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [
        tokenizer.apply_chat_template(
            head + [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for i in range(n)
    ]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a left-padded batch, as `generate` wants for decoder-only models."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask
