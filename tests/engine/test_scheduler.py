"""The scheduler's shared prefill budget: chunks per sequence, room for waiting sequences, decodes always."""

from __future__ import annotations

import itertools

import torch

from node.engine.kv_cache import KVCache
from node.engine.scheduler import Scheduler, Sequence
from node.engine.types import GenerationRequest

_ids = itertools.count()


def seq(n_tokens: int) -> Sequence:
    tokens = list(range(3, 3 + n_tokens))
    request = GenerationRequest(f"s{next(_ids)}", tokens)
    return Sequence(request, None, lambda out: None, None, None, tokens=list(tokens), num_prompt=n_tokens)


def scheduler(budget: int, max_num_seqs: int = 8, blocks: int = 512) -> Scheduler:
    return Scheduler(KVCache(1, blocks, 4, 1, 2, torch.float32, torch.device("cpu")), max_num_seqs, budget)


def run_step(s: Scheduler) -> dict[str, int]:
    """Schedule one step and pretend it ran: tokens per request id (decodes sample a token)."""
    step = s.schedule()
    for q, w in step.decodes + step.prefills:
        q.num_cached = w.end
    for q in step.sampling_seqs():
        q.tokens.append(0)
    return {q.request_id: w.end - w.start for q, w in step.decodes + step.prefills}


def test_a_long_prompt_is_read_a_chunk_per_step_and_leaves_room() -> None:
    s = scheduler(32)  # chunk 8
    assert s.prefill_chunk == 8
    long, short = seq(100), seq(5)
    s.add(long)
    assert run_step(s) == {long.request_id: 8}
    s.add(short)
    assert run_step(s) == {long.request_id: 8, short.request_id: 5}  # admitted beside it at once
    assert run_step(s) == {long.request_id: 8, short.request_id: 1}  # and decoding from then on
    while long.num_cached < 100:
        assert run_step(s)[short.request_id] == 1  # a decode token every step
    assert long.num_generated == 1


def test_running_prefills_leave_one_chunk_to_a_waiting_sequence() -> None:
    s = scheduler(32)
    longs = [seq(200) for _ in range(5)]
    for q in longs:
        s.add(q)
    assert list(run_step(s).values()) == [8, 8, 8, 8]  # the budget holds four chunks
    late = seq(3)
    s.add(late)
    got = run_step(s)
    # three running prefills (the reserve is one chunk), then the waiting in order: the fifth long
    # one (first come, first served) takes the reserved chunk
    assert list(got.values()) == [8, 8, 8, 8] and longs[4].request_id in got and longs[3].request_id not in got
    got = run_step(s)
    assert got[late.request_id] == 3 and sum(got.values()) <= 32


def test_no_reserve_when_nothing_can_be_admitted() -> None:
    s = scheduler(32, max_num_seqs=2)
    a, b, c = seq(100), seq(100), seq(4)
    for q in (a, b, c):
        s.add(q)
    for _ in range(3):  # c cannot be admitted (2 running): a and b keep the whole budget
        assert run_step(s) == {a.request_id: 8, b.request_id: 8}


def test_budget_smaller_than_two_chunks_never_stalls() -> None:
    s = scheduler(1)  # chunk 1, no room for a reserve
    long = seq(6)
    s.add(long)
    s.add(seq(2))
    steps = 0
    while long.num_generated == 0:
        run_step(s)
        steps += 1
        assert steps < 50
