"""`MemoryJournal`: the `Journal` in a dict, for unit tests only (nothing survives the process)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Collection

from attribution.errors import DuplicateEntry, IntervalConflict, InvalidJournalInput, JournalClosed
from attribution.storage.entries import (
    UNCOMMITTED,
    CommitTx,
    Entry,
    State,
    Usage,
    address_key,
    batch_after,
    check_commit_tx,
    check_interval,
    check_limit,
    journaled_again,
    plan_transition,
    validate_usage,
)


class MemoryJournal:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # appenders may be threads as well as tasks
        self._entries: dict[bytes, Entry] = {}  # insertion order = append order
        self._intervals: dict[bytes, list[tuple[int, int]]] = {}  # payer key -> sorted [(high, low)]
        self._commit_txs: dict[bytes, CommitTx] = {}  # tx hash -> tx, in send order
        self._closed = False

    def append_blocking(self, usage: Usage) -> Entry:
        validate_usage(usage)
        now = time.time()
        entry = Entry(usage, State.FREE if usage.free else State.RECORDED, None, now, now)
        with self._lock:
            self._check_open()
            if usage.digest in self._entries:
                raise DuplicateEntry(usage.digest)
            self._entries[usage.digest] = entry
        return entry

    async def append(self, usage: Usage) -> Entry:
        return self.append_blocking(usage)

    async def reserve(self, payer: str, low: int, high: int) -> None:
        check_interval(low, high)
        with self._lock:
            self._check_open()
            accepted = self._intervals.setdefault(address_key(payer), [])
            i = bisect.bisect_right(accepted, (low, float("inf")))  # first interval ending after `low`
            if i < len(accepted) and accepted[i][1] < high:
                raise IntervalConflict(payer, (low, high), (accepted[i][1], accepted[i][0]))
            accepted.insert(i, (high, low))

    async def transition(self, digests: Collection[bytes], target: State, *, batch_id: int | None = None) -> int:
        with self._lock:
            self._check_open()
            current = {d: (e.state, e.batch_id) for d in digests if (e := self._entries.get(d))}
            changes = plan_transition(current, digests, target, batch_id)
            now = time.time()
            for d in changes:
                e = self._entries[d]
                self._entries[d] = Entry(e.usage, target, batch_after(e.batch_id, target, batch_id), e.recorded_at, now)
            return len(changes)

    async def transition_batch(self, batch_id: int, target: State) -> int:
        return await self.transition([e.usage.digest for e in await self.batch(batch_id)], target)

    async def add_commit_tx(self, batch_id: int, tx_hash: bytes, nonce: int) -> CommitTx:
        check_commit_tx(tx_hash, nonce)
        with self._lock:
            self._check_open()
            known = self._commit_txs.get(bytes(tx_hash))
            if known is not None:
                return journaled_again(known, batch_id)
            if not any(e.batch_id == batch_id and e.state is State.BATCHED for e in self._entries.values()):
                raise InvalidJournalInput(f"batch {batch_id} has no batched entries: no commit is sent for it")
            tx = self._commit_txs[bytes(tx_hash)] = CommitTx(batch_id, bytes(tx_hash), nonce, time.time())
            return tx

    async def commit_txs(self, batch_id: int) -> list[CommitTx]:
        with self._lock:
            self._check_open()
            return [tx for tx in self._commit_txs.values() if tx.batch_id == batch_id]

    async def get(self, digest: bytes) -> Entry | None:
        with self._lock:
            self._check_open()
            return self._entries.get(digest)

    async def in_state(self, state: State, limit: int = 1000) -> list[Entry]:
        check_limit(limit)
        return [e for e in self._snapshot() if e.state is state][:limit]

    async def batch(self, batch_id: int) -> list[Entry]:
        return [e for e in self._snapshot() if e.batch_id == batch_id]

    async def depth(self) -> dict[State, int]:
        counts = dict.fromkeys(State, 0)
        for e in self._snapshot():
            counts[e.state] += 1
        return counts

    async def uncommitted_charge(self, payer: str) -> int:
        return sum(e.usage.record.charge for e in self._paid(payer) if e.state in UNCOMMITTED)

    async def highest_cap(self, payer: str) -> int:
        with self._lock:
            self._check_open()
            accepted = self._intervals.get(address_key(payer))
        return accepted[-1][0] if accepted else 0

    async def voucher(self, payer: str) -> Entry | None:
        # on equal caps (only possible without `reserve`) the newest, as the SQLite journal's index order gives
        return max(reversed(self._paid(payer)), key=lambda e: e.usage.request.cumulative_cap, default=None)

    async def due(self, deadline_at_most: int, limit: int = 1000) -> list[Entry]:
        check_limit(limit)
        due = [e for e in self._snapshot() if e.state in UNCOMMITTED and e.usage.request.deadline <= deadline_at_most]
        return sorted(due, key=lambda e: e.usage.request.deadline)[:limit]

    async def close(self) -> None:
        self._closed = True

    def _snapshot(self) -> list[Entry]:
        with self._lock:
            self._check_open()
            return list(self._entries.values())

    def _paid(self, payer: str) -> list[Entry]:
        key = address_key(payer)
        return [e for e in self._snapshot() if not e.usage.free and address_key(e.usage.request.payer) == key]

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosed("the journal is closed")
