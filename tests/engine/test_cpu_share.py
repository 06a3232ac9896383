"""The engine's thread count under other processes' load (node/engine/cpu_share.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from node.config import Settings
from node.engine import AsyncEngine, GenerationRequest, SamplingParams
from node.engine.cpu_share import CpuShare
from node.threads import run_in_fresh_thread


def share(max_threads: int, cpus: int) -> CpuShare:
    s = CpuShare(max_threads)
    s.cpus = list(range(cpus))
    return s


@pytest.mark.parametrize(
    ("cpus", "max_threads", "others", "want"),
    [
        (2, 2, 0.0, 2), (2, 2, 0.49, 2), (2, 2, 0.51, 1), (2, 2, 1.0, 1), (2, 2, 2.0, 1),
        (8, 8, 2.4, 6), (8, 8, 2.6, 5), (8, 4, 1.0, 4), (8, 4, 5.0, 3), (1, 1, 1.0, 1),
    ],
)  # fmt: skip
def test_threads_for_the_cpus_left(cpus: int, max_threads: int, others: float, want: int) -> None:
    s = share(max_threads, cpus)
    s.update(others)
    assert s.update(others) == want  # the second agreeing reading applies it


def test_fewer_threads_at_once_more_after_two_agreeing_readings() -> None:
    s = share(4, 4)
    assert [s.update(x) for x in (0.0, 1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0)] == [4, 3, 3, 2, 2, 2, 3, 3, 4]


# spins on one CPU until its stdin closes (killed at the end of the test, or its parent is gone)
_SPIN = (
    "import os, select\nos.sched_setaffinity(0, {{{cpu}}})\nprint('busy', flush=True)\n"
    "while not select.select([0], [], [], 0)[0]:\n    pass\n"
)


@contextmanager
def neighbours(n: int) -> Iterator[None]:
    """`n` processes busy on our CPUs (round robin), each spinning from before this is entered until it is left."""
    cpus = sorted(os.sched_getaffinity(0))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SPIN.format(cpu=cpus[i % len(cpus)])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout.readline() == "busy\n", "a neighbour did not start"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()


needs_procfs = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")


@needs_procfs
def test_a_busy_neighbour_is_seen() -> None:
    """A real process busy on one of our CPUs: a reading over 0.6 s sees at least most of a CPU taken."""
    with neighbours(1):
        s = CpuShare(2, interval_s=0.5)
        time.sleep(0.6)  # the interval measured
        s.threads()
    assert s.others >= 0.7


@needs_procfs
async def test_the_engine_computes_with_the_cpus_left(tiny_model_dir) -> None:
    """Neighbours busy on all our CPUs but one: the engine thread drops to one thread within a few
    readings, and gives the configured count back when it stops."""
    cpus = len(os.sched_getaffinity(0))
    if not 2 <= cpus <= 8:
        pytest.skip(f"{cpus} CPUs: the test keeps all but one busy")
    engine = AsyncEngine.load(Settings(model=str(tiny_model_dir), threads=2))
    seen: set[int] = set()
    with neighbours(cpus - 1):
        await engine.start()
        try:
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline and 1 not in seen:
                sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
                async for _ in engine.generate(GenerationRequest(f"busy-{time.monotonic()}", [5, 6, 7], sp)):
                    seen.add(engine.stats()["threads"])
        finally:
            await engine.stop()
    assert 1 in seen
    assert run_in_fresh_thread(torch.get_num_threads) == 2  # what a thread gets while the engine is stopped
