"""Crash safety: a child process appending as fast as it can is SIGKILLed (twice, the second time
after recovering the first crash). Every write it had acknowledged is in the journal after reopening,
exactly as written; nothing is doubled; nothing else is there; the file passes SQLite's integrity check."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attribution.errors import IntervalConflict
from attribution.storage import SqliteJournal, State
from tests.attribution.storage.factory import MAX_CHARGE, paid

REPO = Path(__file__).resolve().parents[3]


def run_and_kill(path: Path, start: int, acks: int) -> tuple[set[int], set[int]]:
    """Starts the child, SIGKILLs it once it acknowledged `acks` appends; (reserved, appended) indices
    it acknowledged, including complete lines still in the pipe when it died."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.attribution.storage.journal_child", str(path), str(start)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reserved: set[int] = set()
    appended: set[int] = set()

    def take(line: str) -> None:
        if line.endswith("\n"):  # a line cut by the kill was not acknowledged
            kind, i = line.split()
            (reserved if kind == "R" else appended).add(int(i))

    deadline = time.monotonic() + 120
    while len(appended) < acks:
        line = child.stdout.readline()
        assert line, f"the child stopped: {child.stderr.read()}"
        assert time.monotonic() < deadline, "the child is too slow"
        take(line)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    for line in child.stdout:
        take(line)
    child.stdout.close()
    child.stderr.close()
    return reserved, appended


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    reserved, appended = set(), set()
    for start in (0, 100_000):  # the second child recovers the first one's crash, then is killed too
        r, a = run_and_kill(path, start, acks=150)
        reserved |= r
        appended |= a

        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            digests = [d for (d,) in conn.execute("SELECT digest FROM entries")]
        assert len(digests) == len(set(digests))

        journal = SqliteJournal(path)
        try:
            for i in appended:
                entry = await journal.get(paid(i).digest)
                assert entry is not None, f"acknowledged append {i} is lost"
                assert (entry.usage, entry.state) == (paid(i), State.RECORDED)
            stored = await journal.in_state(State.RECORDED, limit=10**6)
            assert len(stored) == len(digests) == sum((await journal.depth()).values())
            for entry in stored:  # nothing half-written or foreign: each entry is the request its cap names
                assert entry.usage == paid(entry.usage.request.cumulative_cap // MAX_CHARGE - 1)
            for i in reserved:
                with pytest.raises(IntervalConflict):
                    await journal.reserve(paid(i).request.payer, *paid(i).request.interval)
        finally:
            await journal.close()
    assert len(appended) >= 300
