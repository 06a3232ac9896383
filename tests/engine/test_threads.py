"""The engine thread is the only thread left with an OpenMP pool (node/threads.py), and an
engine can be stopped and started again."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from node.config import Settings
from node.engine import AsyncEngine
from node.threads import run_in_fresh_thread
from tests.engine.test_engine import prompt, run


def os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def settles_to(before: set[str], timeout_s: float = 60.0) -> bool:
    """Every OS thread started since `before` was taken has exited (a pool's workers exit just after their
    thread). Threads are compared by id, not counted: one that other code ends meanwhile hides no new one."""
    deadline = time.monotonic() + timeout_s
    while os_threads() - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_run_in_fresh_thread_returns_raises_and_ends() -> None:
    seen: list[threading.Thread] = []

    def work(a: int, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert run_in_fresh_thread(work, 2, 3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        run_in_fresh_thread(lambda: 1 / 0)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_parallel_work_in_a_fresh_thread_leaves_no_threads_behind() -> None:
    """What the helper is for: a thread that ran parallel torch ops keeps an OpenMP pool while
    it lives; a fresh thread takes its pool with it."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no OpenMP pool to leave behind")
    x = torch.randn(2048, 2048)
    before = os_threads()
    run_in_fresh_thread(lambda: (x @ x).sum())
    assert settles_to(before)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_loading_leaves_no_threads_behind(tiny_model_dir) -> None:
    before = os_threads()
    engine = AsyncEngine.load(Settings(model=str(tiny_model_dir), kv_block_size=4, num_kv_blocks=4096))
    assert settles_to(before)
    assert not engine.runner.alive


async def test_engine_restarts(tiny_model_dir) -> None:
    engine = AsyncEngine.load(Settings(model=str(tiny_model_dir), kv_block_size=4))
    await engine.start()
    try:
        first = await run(engine, prompt(9, 1), max_tokens=10)
        await engine.stop()
        assert not engine.healthy
        await engine.start()
        assert engine.healthy
        assert await run(engine, prompt(9, 1), max_tokens=10) == first
    finally:
        await engine.stop()
