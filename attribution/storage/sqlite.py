"""`SqliteJournal`: the durable `Journal`, one SQLite file in WAL mode with group commit.

Durability: an acknowledged write (the call returned) survives SIGKILL of the node and a power loss.
* `journal_mode=WAL`: a commit appends its pages to the write-ahead log, one sequential write;
  readers (queries, metrics) never block the writer nor wait for it.
* `synchronous=FULL`: every commit fsyncs the WAL before it returns. `NORMAL` would skip that fsync
  (syncing only at checkpoints): still safe against a killed process, whose writes are in the OS page
  cache, but a power loss or kernel crash could drop the last acknowledged commits, i.e. records the
  node signed and answered with, which the payer would then never be charged for. The fsync costs
  ~0.1-1 ms depending on the disk; group commit (`group_commit.py`) pays it once per group of writes,
  not once per record. Checkpoints (`wal_autocheckpoint`, every ~1000 pages) run inside a commit on
  the writer thread: that group waits for one more fsync of the database file, no write is lost.
* A new file's directory entry is fsynced once at creation (SQLite syncs the directory for the WAL,
  not for the main database file).
* One process at a time: `flock` on `<path>.lock` (released by the kernel when the holder dies). A
  second node on one journal would reserve intervals the other cannot see.

Reads go through their own connection on a worker thread (`asyncio.to_thread`): they see every
acknowledged write and never stall the event loop on a long query.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

from attribution.errors import (
    DuplicateEntry,
    IntervalConflict,
    InvalidJournalInput,
    JournalClosed,
    JournalError,
    JournalLocked,
)
from attribution.storage import rows
from attribution.storage.entries import (
    MAX_INT64,
    CommitTx,
    Entry,
    State,
    Usage,
    address_key,
    batch_after,
    check_commit_tx,
    check_interval,
    check_limit,
    check_target,
    journaled_again,
    plan_transition,
    validate_usage,
)
from attribution.storage.group_commit import GroupCommitter

T = TypeVar("T")
_CHUNK = 500  # digests per `IN (...)` lookup, well under SQLite's 32766 variables


class SqliteJournal:
    def __init__(self, path: str | Path, *, max_group: int = 4096) -> None:
        self.path = Path(path)
        self._lock_file = _lock(self.path)
        connections: list[sqlite3.Connection] = []
        try:
            connections.append(writer := _connect(self.path))
            _prepare(writer, self.path)
            connections.append(reader := _connect(self.path))
            reader.execute("PRAGMA query_only = ON")
        except BaseException as exc:
            for conn in connections:
                conn.close()
            os.close(self._lock_file)
            if isinstance(exc, sqlite3.Error):
                raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
            raise
        self._reader = reader
        self._read_lock = threading.Lock()
        self._writer = GroupCommitter(writer, max_group)
        self._closed = False

    # writes: on the writer thread, durable when they return

    async def append(self, usage: Usage) -> Entry:
        entry = self._entry(usage)
        return await self._writer.run(_insert(entry))

    def append_blocking(self, usage: Usage) -> Entry:
        entry = self._entry(usage)
        return self._writer.run_blocking(_insert(entry))

    async def reserve(self, payer: str, low: int, high: int) -> None:
        check_interval(low, high)
        key, low_b, high_b = address_key(payer), rows.u128(low), rows.u128(high)

        def op(conn: sqlite3.Connection) -> None:
            hit = conn.execute(rows.FIRST_ENDING_AFTER, (key, low_b)).fetchone()
            if hit is not None and hit[0] < high_b:
                raise IntervalConflict(payer, (low, high), (int.from_bytes(hit[0]), int.from_bytes(hit[1])))
            conn.execute(rows.ACCEPT, (key, high_b, low_b))

        await self._writer.run(op)

    async def transition(self, digests: Collection[bytes], target: State, *, batch_id: int | None = None) -> int:
        check_target(target, batch_id)
        digests = [bytes(d) for d in digests]

        def op(conn: sqlite3.Connection) -> int:
            current = {}
            for i in range(0, len(digests), _CHUNK):
                chunk = digests[i : i + _CHUNK]
                current.update((d, (State(s), b)) for d, s, b in conn.execute(rows.states_of(len(chunk)), chunk))
            return _apply(conn, current, digests, target, batch_id)

        return await self._writer.run(op)

    async def transition_batch(self, batch_id: int, target: State) -> int:
        check_target(target, None)

        def op(conn: sqlite3.Connection) -> int:
            current = {d: (State(s), b) for d, s, b in conn.execute(rows.STATES_OF_BATCH, (batch_id,))}
            return _apply(conn, current, list(current), target, None)

        return await self._writer.run(op)

    async def add_commit_tx(self, batch_id: int, tx_hash: bytes, nonce: int) -> CommitTx:
        check_commit_tx(tx_hash, nonce)
        tx = CommitTx(batch_id, bytes(tx_hash), nonce, time.time())

        def op(conn: sqlite3.Connection) -> CommitTx:
            known = conn.execute(rows.COMMIT_TX, (tx.tx_hash,)).fetchone()
            if known is not None:
                return journaled_again(rows.commit_tx(known), batch_id)
            if conn.execute(rows.HAS_BATCHED, (batch_id,)).fetchone() is None:
                raise InvalidJournalInput(f"batch {batch_id} has no batched entries: no commit is sent for it")
            conn.execute(rows.ADD_COMMIT_TX, (tx.batch_id, tx.tx_hash, tx.nonce, tx.sent_at))
            return tx

        return await self._writer.run(op)

    # queries: on the reader connection

    async def commit_txs(self, batch_id: int) -> list[CommitTx]:
        return await self._read(lambda c: [rows.commit_tx(r) for r in c.execute(rows.COMMIT_TXS, (batch_id,))])

    async def get(self, digest: bytes) -> Entry | None:
        found = await self._entries(rows.GET, (bytes(digest),))
        return found[0] if found else None

    async def in_state(self, state: State, limit: int = 1000) -> list[Entry]:
        check_limit(limit)
        return await self._entries(rows.IN_STATE, (State(state).value, limit))

    async def batch(self, batch_id: int) -> list[Entry]:
        return await self._entries(rows.IN_BATCH, (batch_id,))

    async def depth(self) -> dict[State, int]:
        counts = await self._read(lambda c: c.execute(rows.DEPTH).fetchall())
        return dict.fromkeys(State, 0) | {State(s): n for s, n in counts}

    async def uncommitted_charge(self, payer: str) -> int:
        key = address_key(payer)
        return await self._read(
            lambda c: sum(int.from_bytes(r[0]) for r in c.execute(rows.UNCOMMITTED_CHARGES, (key,)))
        )

    async def highest_cap(self, payer: str) -> int:
        key = address_key(payer)
        hit = await self._read(lambda c: c.execute(rows.HIGHEST_CAP, (key,)).fetchone())
        return 0 if hit is None else int.from_bytes(hit[0])

    async def voucher(self, payer: str) -> Entry | None:
        found = await self._entries(rows.VOUCHER, (address_key(payer),))
        return found[0] if found else None

    async def due(self, deadline_at_most: int, limit: int = 1000) -> list[Entry]:
        check_limit(limit)
        return await self._entries(rows.DUE, (min(max(deadline_at_most, -1), MAX_INT64), limit))

    @property
    def commits(self) -> tuple[int, int]:
        """(transactions committed, writes in them): their ratio is the mean group size."""
        return self._writer.groups, self._writer.ops

    async def close(self) -> None:
        await asyncio.to_thread(self.close_blocking)

    def close_blocking(self) -> None:
        """Commits what is queued, closes the connections and releases the file."""
        if self._closed:
            return
        self._writer.close()
        with self._read_lock:
            self._closed = True
            self._reader.close()
        self._writer.connection.close()
        os.close(self._lock_file)

    def _entry(self, usage: Usage) -> Entry:
        validate_usage(usage)
        now = time.time()
        return Entry(usage, State.FREE if usage.free else State.RECORDED, None, now, now)

    async def _entries(self, sql: str, params: tuple[object, ...]) -> list[Entry]:
        return await self._read(lambda c: [rows.from_row(r) for r in c.execute(sql, params)])

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._read_blocking, fn)

    def _read_blocking(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._read_lock:
            if self._closed:
                raise JournalClosed("the journal is closed")
            return fn(self._reader)


def _insert(entry: Entry) -> Callable[[sqlite3.Connection], Entry]:
    row = rows.to_row(entry)

    def op(conn: sqlite3.Connection) -> Entry:
        try:
            conn.execute(rows.INSERT, row)
        except sqlite3.IntegrityError as exc:
            if "entries.digest" in str(exc):
                raise DuplicateEntry(entry.usage.digest) from None
            raise
        return entry

    return op


def _apply(
    conn: sqlite3.Connection,
    current: dict[bytes, tuple[State, int | None]],
    digests: list[bytes],
    target: State,
    batch_id: int | None,
) -> int:
    changes = plan_transition(current, digests, target, batch_id)
    now = time.time()
    updates = [(target.value, batch_after(current[d][1], target, batch_id), now, d) for d in changes]
    conn.executemany(rows.UPDATE_STATE, updates)
    return len(changes)


def _lock(path: Path) -> int:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalLocked(f"the journal {path} is open in another process or journal") from None
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, the group committer issues BEGIN / COMMIT itself
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """WAL + FULL (see the module docstring); creates the schema in a new file, migrates an older one (in one
    transaction: an interrupted migration leaves the old version), refuses a newer one."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise JournalError(f"the journal {path} cannot use WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > rows.SCHEMA_VERSION:
        raise JournalError(f"the journal {path} has schema version {version}; this node reads {rows.SCHEMA_VERSION}")
    if version == rows.SCHEMA_VERSION:
        return
    script = "".join(rows.MIGRATIONS[max(version, 1) - 1 :])
    if version == 0:
        script = rows.SCHEMA + script
    conn.executescript(f"BEGIN IMMEDIATE; {script} PRAGMA user_version = {rows.SCHEMA_VERSION}; COMMIT;")
    if version == 0:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
