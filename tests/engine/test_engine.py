"""Continuous batching, admission, preemption, cancellation and sampling on the tiny model."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from node.config import Settings
from node.engine import AsyncEngine, FinishReason, GenerationRequest, PromptTooLongError, SamplingParams

_ids = itertools.count()


@pytest.fixture
async def make_engine(tiny_model_dir):
    engines: list[AsyncEngine] = []

    async def make(**kw) -> AsyncEngine:
        kw.setdefault("kv_block_size", 4)
        engine = AsyncEngine.load(Settings(model=str(tiny_model_dir), **kw))
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        await e.stop()


def prompt(n: int, seed: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 390 for i in range(n)]


async def run(engine: AsyncEngine, ids: list[int], **sp) -> tuple[list[int], str, FinishReason]:
    sp.setdefault("temperature", 0)
    sp.setdefault("ignore_eos", True)
    tokens: list[int] = []
    text = ""
    reason = None
    async for out in engine.generate(GenerationRequest(f"r{next(_ids)}", ids, SamplingParams(**sp))):
        tokens += out.token_ids
        text += out.text
        reason = out.finish_reason
    return tokens, text, reason


async def test_request_joining_mid_batch_matches_solo_run(make_engine):
    engine = await make_engine()
    solo_late = await run(engine, prompt(11, 2), max_tokens=12)
    solo_long = await run(engine, prompt(7, 1), max_tokens=40)
    long_task = asyncio.create_task(run(engine, prompt(7, 1), max_tokens=40))
    while engine.runner.generated_tokens < len(solo_late[0]) + len(solo_long[0]) + 5:
        await asyncio.sleep(0.001)  # the long request is decoding when the late one arrives
    late = await run(engine, prompt(11, 2), max_tokens=12)
    assert not long_task.done()  # they really shared steps
    assert late == solo_late
    assert await long_task == solo_long


async def test_many_concurrent_requests_match_solo_runs(make_engine):
    engine = await make_engine(max_num_seqs=5, max_prefill_tokens=16)
    specs = [(prompt(3 + 5 * i, i), 5 + 3 * i) for i in range(12)]
    solo = [await run(engine, p, max_tokens=m) for p, m in specs]
    together = await asyncio.gather(*(run(engine, p, max_tokens=m) for p, m in specs))
    assert list(together) == solo
    assert engine.stats()["kv_blocks_used"] == 0


async def test_running_batch_bounded_by_max_num_seqs(make_engine):
    engine = await make_engine(max_num_seqs=3)
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, engine.stats()["running"])
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(run(engine, prompt(5, i), max_tokens=20) for i in range(8)))
    watcher.cancel()
    assert 1 <= peak <= 3


async def test_preemption_under_kv_pressure_keeps_outputs(make_engine):
    # 12 blocks of 4 tokens: four sequences growing to 30 tokens each cannot all stay resident.
    engine = await make_engine(num_kv_blocks=12, max_num_seqs=4)
    specs = [prompt(10, i) for i in range(4)]
    solo = [await run(engine, p, max_tokens=20) for p in specs]
    together = await asyncio.gather(*(run(engine, p, max_tokens=20) for p in specs))
    assert list(together) == solo
    assert engine.stats()["kv_blocks_used"] == 0


async def test_cancelled_request_frees_its_blocks(make_engine):
    engine = await make_engine()
    gen = engine.generate(
        GenerationRequest("cancel-me", prompt(20, 3), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    )
    await gen.__anext__()
    assert engine.stats()["kv_blocks_used"] > 0
    await gen.aclose()
    for _ in range(200):
        if engine.stats() == {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 2048}:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


async def test_seeded_sampling_is_reproducible_and_batch_independent(make_engine):
    engine = await make_engine()
    p = prompt(8, 5)
    a = await run(engine, p, max_tokens=30, temperature=1.0, seed=42)
    b, _ = await asyncio.gather(
        run(engine, p, max_tokens=30, temperature=1.0, seed=42),
        run(engine, prompt(9, 6), max_tokens=30, temperature=1.0, seed=7),
    )
    c = await run(engine, p, max_tokens=30, temperature=1.0, seed=43)
    assert a == b
    assert a[0] != c[0]


async def test_top_k_one_and_tiny_top_p_are_greedy(make_engine):
    engine = await make_engine()
    p = prompt(8, 9)
    greedy = await run(engine, p, max_tokens=20)
    assert (await run(engine, p, max_tokens=20, temperature=1.5, top_k=1, seed=1))[0] == greedy[0]
    assert (await run(engine, p, max_tokens=20, temperature=1.5, top_p=1e-6, seed=1))[0] == greedy[0]


async def test_max_tokens_and_length_finish(make_engine):
    engine = await make_engine()
    tokens, _, reason = await run(engine, prompt(6, 1), max_tokens=7)
    assert len(tokens) == 7 and reason is FinishReason.LENGTH


async def test_eos_stops_unless_ignored(make_engine):
    engine = await make_engine()
    eos = engine.tokenizer.eos_token_id
    # find a prompt whose greedy continuation hits EOS within 200 tokens
    for seed in range(200):
        tokens, _, _ = await run(engine, prompt(6, seed), max_tokens=60)
        if eos in tokens:
            break
    else:
        pytest.skip("no greedy continuation of the tiny model reaches EOS")
    stopped, _, reason = await run(engine, prompt(6, seed), max_tokens=60, ignore_eos=False)
    assert reason is FinishReason.STOP
    assert stopped == tokens[: tokens.index(eos) + 1]


async def test_stop_string_cuts_text(make_engine):
    engine = await make_engine()
    p = prompt(6, 11)
    _, full, _ = await run(engine, p, max_tokens=40)
    stop = full[10:13]
    assert len(stop) == 3
    _, text, reason = await run(engine, p, max_tokens=40, stop=(stop,))
    assert reason is FinishReason.STOP
    assert text == full[: full.index(stop)]


async def test_prompt_longer_than_context_is_rejected(make_engine):
    engine = await make_engine(max_model_len=64)
    with pytest.raises(PromptTooLongError, match="maximum context length is 64"):
        await run(engine, prompt(60, 1), max_tokens=5)
    with pytest.raises(PromptTooLongError, match="empty"):
        await run(engine, [], max_tokens=5)


async def test_request_larger_than_kv_cache_is_rejected(make_engine):
    engine = await make_engine(num_kv_blocks=4)
    with pytest.raises(PromptTooLongError, match="KV cache"):
        await run(engine, prompt(10, 1), max_tokens=10)


async def test_short_request_is_not_stalled_by_a_long_prefill(make_engine):
    """While a long prompt is prefilled (a chunk of 4 tokens per step here: 120 steps), a short
    request sent meanwhile gets its first token within a few steps, before the long one's, and a
    request already decoding finishes meanwhile; every output equals its solo run."""
    # no prefix cache: the solo runs would leave the long prompt's blocks for its second run
    engine = await make_engine(max_prefill_tokens=16, prefix_caching=False)  # before chunking: 30 steps of 16
    long_ids, short_ids, decoding_ids = prompt(480, 7), prompt(4, 8), prompt(6, 9)
    solo = [await run(engine, ids, max_tokens=n) for ids, n in ((long_ids, 3), (short_ids, 3), (decoding_ids, 30))]
    firsts: dict[str, int] = {}  # name -> the engine's step count when its first token was emitted
    submitted: dict[str, int] = {}
    runner = engine.runner
    # Steps are read in the engine thread, as they happen: on a loaded machine the event loop can see
    # an output many steps after it was made.
    submit, emit = runner.submit, runner._emit

    def name_of(request_id: str) -> str:
        return request_id.rstrip("0123456789")

    def recording_submit(request, *args, **kwargs):
        submitted.setdefault(name_of(request.request_id), runner.steps)
        return submit(request, *args, **kwargs)

    def recording_emit(seq, *args, **kwargs):
        firsts.setdefault(name_of(seq.request_id), runner.steps)
        return emit(seq, *args, **kwargs)

    runner.submit, runner._emit = recording_submit, recording_emit

    async def timed(name: str, ids: list[int], n: int):
        tokens: list[int] = []
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"{name}{next(_ids)}", ids, sp)):
            tokens += out.token_ids
        return tokens

    decoding = asyncio.create_task(timed("decoding", decoding_ids, 30))
    while "decoding" not in firsts:
        await asyncio.sleep(0.001)
    long = asyncio.create_task(timed("long", long_ids, 3))
    start = engine.runner.steps
    while engine.runner.steps < start + 3:  # the long prompt is being read
        await asyncio.sleep(0.001)
    short = await timed("short", short_ids, 3)
    assert firsts["short"] - submitted["short"] <= 10  # generous: the scheduler admits it at the next step
    assert "long" not in firsts  # the long prefill is still running
    decoded = await decoding  # a token per step: 30 steps, a quarter of the long prefill
    assert "long" not in firsts
    assert [await long, short, decoded] == [s[0] for s in solo]
