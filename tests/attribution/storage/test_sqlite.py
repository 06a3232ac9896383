"""What only the durable journal promises: it survives a restart, one process holds it at a time, it
refuses files it cannot read with one clear error, its writes are fsynced, its queries are index
searches, and concurrent writers share commits."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from attribution.errors import IntervalConflict, JournalError, JournalLocked
from attribution.storage import SqliteJournal, State, rows
from tests.attribution.storage.factory import PAYERS, free, paid


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SqliteJournal(path)
    for i in range(6):
        await journal.reserve(PAYERS[0], *paid(i).request.interval)
        await journal.append(paid(i))
    await journal.append(free(0))
    await journal.transition([paid(i).digest for i in (0, 1, 2)], State.BATCHED, batch_id=7)
    await journal.transition_batch(7, State.COMMITTED)
    await journal.transition([paid(3).digest], State.REFUNDED)
    before = [await journal.get(u.digest) for u in [*map(paid, range(6)), free(0)]]
    depth = await journal.depth()
    await journal.close()

    reopened = SqliteJournal(path)
    assert [await reopened.get(u.digest) for u in [*map(paid, range(6)), free(0)]] == before
    assert await reopened.depth() == depth == {**dict.fromkeys(State, 0), State.COMMITTED: 3, State.REFUNDED: 1,
                                               State.RECORDED: 2, State.FREE: 1}  # fmt: skip
    assert await reopened.uncommitted_charge(PAYERS[0]) == 2 * 600
    assert await reopened.highest_cap(PAYERS[0]) == paid(5).request.cumulative_cap
    with pytest.raises(IntervalConflict):  # a replay after the restart is still refused
        await reopened.reserve(PAYERS[0], *paid(2).request.interval)
    assert await reopened.transition_batch(7, State.COMMITTED) == 0  # and transitions stay idempotent
    assert await reopened.transition_batch(7, State.FINALIZED) == 3
    await reopened.close()


async def test_commit_txs_survive_a_restart(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    await journal.append(paid(0))
    await journal.transition([paid(0).digest], State.BATCHED, batch_id=3)
    sent = [await journal.add_commit_tx(3, bytes([i]) * 32, 5) for i in (9, 4)]
    await journal.close()
    reopened = SqliteJournal(tmp_path / "journal.db")
    assert await reopened.commit_txs(3) == sent
    await reopened.close()


def _tables(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()


async def test_a_version_1_journal_is_migrated_in_place(tmp_path: Path) -> None:
    """A journal written before commit transactions were journaled (schema 1) opens with its entries and
    intervals as they were, gains the commit transaction table, and then matches a new journal's schema."""
    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as conn:
        conn.executescript(f"{rows.SCHEMA} PRAGMA user_version = 1;")
    journal = SqliteJournal(old)
    await journal.reserve(PAYERS[0], *paid(0).request.interval)
    await journal.append(paid(0))
    await journal.transition([paid(0).digest], State.BATCHED, batch_id=4)
    await journal.close()
    with sqlite3.connect(old) as conn:  # back to version 1 exactly: the new table dropped
        conn.executescript("DROP TABLE commit_txs; PRAGMA user_version = 1;")
    before = _tables(old)
    migrated = SqliteJournal(old)
    assert (await migrated.get(paid(0).digest)).state is State.BATCHED
    assert await migrated.highest_cap(PAYERS[0]) == paid(0).request.cumulative_cap
    assert await migrated.commit_txs(4) == []
    await migrated.add_commit_tx(4, b"\5" * 32, 0)
    assert [t.tx_hash for t in await migrated.commit_txs(4)] == [b"\5" * 32]
    await migrated.close()
    SqliteJournal(tmp_path / "new.db").close_blocking()
    assert _tables(old) == _tables(tmp_path / "new.db") != before
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (rows.SCHEMA_VERSION,) == (2,)


async def test_one_journal_per_file(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    with pytest.raises(JournalLocked, match="open in another process"):
        SqliteJournal(tmp_path / "journal.db")
    await journal.close()
    SqliteJournal(tmp_path / "journal.db").close_blocking()


def test_unreadable_files_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "garbage.db").write_bytes(b"not a database, " * 512)
    with pytest.raises(JournalError, match="cannot open the journal .*garbage.db: file is not a database"):
        SqliteJournal(tmp_path / "garbage.db")
    with sqlite3.connect(tmp_path / "future.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(JournalError, match="schema version 99; this node reads 2"):
        SqliteJournal(tmp_path / "future.db")
    with pytest.raises(JournalError, match="not a database"):  # not JournalLocked: the refused open let go
        SqliteJournal(tmp_path / "garbage.db")


def test_commits_are_fsynced_in_wal_mode(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    conn = journal._writer.connection
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: fsync at every commit
    journal.close_blocking()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("GET", (b"d",)), ("IN_STATE", ("recorded", 10)), ("IN_BATCH", (1,)), ("VOUCHER", (b"p",)),
        ("DUE", (5, 10)), ("UNCOMMITTED_CHARGES", (b"p",)), ("STATES_OF_BATCH", (1,)),
        ("FIRST_ENDING_AFTER", (b"p", b"l")), ("HIGHEST_CAP", (b"p",)), ("HAS_BATCHED", (1,)),
        ("COMMIT_TX", (b"h",)), ("COMMIT_TXS", (1,)),
    ],
)  # fmt: skip
def test_queries_are_index_searches_without_sorting(name: str, params: tuple[object, ...]) -> None:
    conn = sqlite3.connect(":memory:")
    conn.executescript(rows.SCHEMA + "".join(rows.MIGRATIONS))
    plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {getattr(rows, name)}", params)]
    assert len(plan) == 1 and plan[0].startswith("SEARCH") and ("INDEX" in plan[0] or "PRIMARY KEY" in plan[0]), plan


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    await asyncio.gather(*(journal.append(paid(i)) for i in range(300)))
    transactions, writes = journal.commits
    assert writes == 300 and transactions < 300
    await journal.close()
