"""The group committer on a real SQLite file: writes queued while one commit runs share the next one,
a failing write rolls back alone, a failing COMMIT fails its whole group and nothing of it lands."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from attribution.errors import JournalClosed, JournalError
from attribution.storage.group_commit import GroupCommitter


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        """PRAGMA journal_mode = WAL;
        CREATE TABLE t (k INTEGER PRIMARY KEY);
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"""
    )
    conn.close()
    yield path


def committer(db: Path, max_group: int = 4096) -> GroupCommitter:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA foreign_keys = ON")
    return GroupCommitter(conn, max_group)


def insert(k: int):
    return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (k,)).lastrowid


def stored(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:  # another connection: sees only what was committed
        return [k for (k,) in conn.execute("SELECT k FROM t ORDER BY k")]


def hold(writer: GroupCommitter) -> threading.Event:
    """Keeps the writer busy inside a transaction until the returned event is set."""
    release, started = threading.Event(), threading.Event()
    writer.submit(lambda conn: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


async def test_writes_queued_during_a_commit_share_the_next_one(db: Path) -> None:
    writer = committer(db)
    release = hold(writer)
    threads = [threading.Thread(target=writer.run_blocking, args=(insert(1000 + t),)) for t in range(8)]
    for t in threads:
        t.start()
    tasks = [asyncio.ensure_future(writer.run(insert(k))) for k in range(100)]
    await asyncio.sleep(0)  # every task submits its write
    while writer._queue.qsize() < 108:
        await asyncio.sleep(0.01)
    assert stored(db) == []  # nothing acknowledged, nothing visible
    release.set()
    assert await asyncio.gather(*tasks) == list(range(100))
    for t in threads:
        t.join()
    assert (writer.groups, writer.ops) == (2, 109)  # the held write's group, then one for all 108
    assert stored(db) == list(range(100)) + [1000 + t for t in range(8)]
    writer.close()


async def test_groups_are_capped_at_max_group(db: Path) -> None:
    writer = committer(db, max_group=4)
    release = hold(writer)
    futures = [writer.submit(insert(k)) for k in range(10)]
    release.set()
    assert [f.result() for f in futures] == list(range(10))
    assert (writer.groups, writer.ops) == (1 + 3, 11)  # 4 + 4 + 2
    writer.close()


async def test_a_failing_write_rolls_back_alone(db: Path) -> None:
    writer = committer(db)
    release = hold(writer)

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (50)")
        raise ValueError("refused")

    futures = [
        writer.submit(insert(1)),
        writer.submit(half_then_fail),
        writer.submit(insert(1)),
        writer.submit(insert(2)),
    ]
    release.set()
    assert futures[0].result() == 1
    with pytest.raises(ValueError, match="refused"):
        futures[1].result()
    with pytest.raises(sqlite3.IntegrityError):
        futures[2].result()
    assert futures[3].result() == 2
    assert stored(db) == [1, 2]
    writer.close()


async def test_a_failed_commit_fails_its_whole_group_and_the_writer_goes_on(db: Path) -> None:
    writer = committer(db)
    release = hold(writer)
    orphan = lambda conn: conn.execute("INSERT INTO child VALUES (7)")  # noqa: E731  FK checked at COMMIT
    futures = [writer.submit(insert(1)), writer.submit(orphan), writer.submit(insert(2))]
    release.set()
    for f in futures:
        with pytest.raises(JournalError, match="could not commit: FOREIGN KEY"):
            f.result()
    assert stored(db) == []
    assert writer.run_blocking(insert(3)) == 3
    assert stored(db) == [3]
    writer.close()


async def test_a_cancelled_waiter_does_not_cancel_its_write(db: Path) -> None:
    writer = committer(db)
    release = hold(writer)
    task = asyncio.ensure_future(writer.run(insert(9)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await writer.run(insert(10))  # FIFO: once this is durable, so is the earlier one
    assert stored(db) == [9, 10]
    writer.close()


async def test_close_commits_what_is_queued_then_refuses(db: Path) -> None:
    writer = committer(db)
    release = hold(writer)
    futures = [writer.submit(insert(k)) for k in range(5)]
    closing = threading.Thread(target=writer.close)
    closing.start()
    release.set()
    closing.join()
    assert [f.result() for f in futures] == list(range(5))
    assert stored(db) == list(range(5))
    with pytest.raises(JournalClosed):
        writer.submit(insert(6))
