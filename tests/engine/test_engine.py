"""Continuous batching, admission, preemption, cancellation and sampling on the tiny model."""

from __future__ import annotations

import asyncio
import itertools
import threading

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


async def run(engine: AsyncEngine, ids: list[int], name: str = "r", **sp) -> tuple[list[int], str, FinishReason]:
    """Generate for `ids` (request id: `name` and a number); the tokens, the text and the finish reason."""
    sp.setdefault("temperature", 0)
    sp.setdefault("ignore_eos", True)
    tokens: list[int] = []
    text = ""
    reason = None
    async for out in engine.generate(GenerationRequest(f"{name}{next(_ids)}", ids, SamplingParams(**sp))):
        tokens += out.token_ids
        text += out.text
        reason = out.finish_reason
    return tokens, text, reason


def name_of(request_id: str) -> str:
    return request_id.rstrip("0123456789")


async def test_request_joining_mid_batch_matches_solo_run(make_engine):
    """A request sent while another decodes joins its batch (it finishes first: they shared steps), and
    both outputs equal their solo runs."""
    engine = await make_engine()
    solo_late = await run(engine, prompt(11, 2), max_tokens=12)
    solo_long = await run(engine, prompt(7, 1), max_tokens=40)
    runner = engine.runner
    # At the long request's 5th token the engine thread waits until the late one is queued: watched from
    # the event loop, a loaded machine could see that token only after the long request had finished.
    decoding, queued = threading.Event(), threading.Event()
    finished: list[str] = []  # in the engine's order
    submit, emit = runner.submit, runner._emit

    def gated_submit(request, *args, **kwargs):
        submit(request, *args, **kwargs)
        if name_of(request.request_id) == "late":
            queued.set()

    def gated_emit(seq, tokens, text, reason):
        if reason is not None:
            finished.append(name_of(seq.request_id))  # before the output can reach the event loop
        emit(seq, tokens, text, reason)
        if reason is None and name_of(seq.request_id) == "long" and seq.num_generated == 5:
            decoding.set()
            assert queued.wait(60)

    runner.submit, runner._emit = gated_submit, gated_emit
    long_task = asyncio.create_task(run(engine, prompt(7, 1), "long", max_tokens=40))
    assert await asyncio.to_thread(decoding.wait, 60)
    late = await run(engine, prompt(11, 2), "late", max_tokens=12)
    assert (late, await long_task) == (solo_late, solo_long)
    assert finished == ["late", "long"]  # the late one ran alongside, not after


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
    async with asyncio.timeout(60):  # the engine thread takes the abort at its next step
        while (stats := engine.stats())["kv_blocks_used"] or stats["running"] or stats["waiting"]:
            await asyncio.sleep(0.01)


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
    lasts: dict[str, int] = {}  # ... when it finished
    submitted: dict[str, int] = {}
    runner = engine.runner
    # Steps are read in the engine thread, as they happen: on a loaded machine the event loop can see
    # an output many steps after it was made. For the same reason the engine thread waits for the next
    # request where it must arrive: the long one at the decoding one's first token, the short one three
    # steps into the long prefill.
    reached = {"decoding": threading.Event(), "long": threading.Event()}
    sent = {"long": threading.Event(), "short": threading.Event()}
    submit, emit, step = runner.submit, runner._emit, runner.step

    def recording_submit(request, *args, **kwargs):
        name = name_of(request.request_id)
        submitted.setdefault(name, runner.steps)
        submit(request, *args, **kwargs)
        if name in sent:
            sent[name].set()

    def recording_emit(seq, tokens, text, reason):
        name = name_of(seq.request_id)
        firsts.setdefault(name, runner.steps)
        if reason is not None:
            lasts[name] = runner.steps
        emit(seq, tokens, text, reason)
        if name == "decoding" and not reached["decoding"].is_set():
            reached["decoding"].set()
            assert sent["long"].wait(60)

    def gated_step():
        if "long" in submitted and runner.steps >= submitted["long"] + 3 and not reached["long"].is_set():
            reached["long"].set()
            assert sent["short"].wait(60)
        return step()

    runner.submit, runner._emit, runner.step = recording_submit, recording_emit, gated_step

    async def timed(name: str, ids: list[int], n: int):
        tokens: list[int] = []
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"{name}{next(_ids)}", ids, sp)):
            tokens += out.token_ids
        return tokens

    decoding = asyncio.create_task(timed("decoding", decoding_ids, 30))
    assert await asyncio.to_thread(reached["decoding"].wait, 60)
    long = asyncio.create_task(timed("long", long_ids, 3))
    assert await asyncio.to_thread(reached["long"].wait, 60)  # the long prompt is being read
    short = await timed("short", short_ids, 3)
    decoded = await decoding
    assert [await long, short, decoded] == [s[0] for s in solo]
    assert firsts["short"] - submitted["short"] <= 10  # generous: the scheduler admits it at the next step
    assert lasts["short"] < firsts["long"]  # done while the long prompt was still read
    assert lasts["decoding"] < firsts["long"]  # a token per step: 30 steps, a quarter of the long prefill
