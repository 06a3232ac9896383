"""The usage journal's interface: what the request path, the batcher, the submitter and the metrics
need from storage. `SqliteJournal` is the durable implementation, `MemoryJournal` the one for unit
tests; `tests/attribution/storage/test_conformance.py` runs one suite against both.

Contract shared by every implementation:
* A write (`append`, `reserve`, `transition*`) returns only once it is durable. Once called it
  happens (or raises), even if the awaiting task is cancelled meanwhile.
* Transitions are all-or-nothing per call, idempotent (an entry already in the target state, and
  batch, is left alone) and follow `entries.TRANSITIONS`; anything else raises `IllegalTransition`.
* Commit transactions (`add_commit_tx`) are written ahead of their broadcast and never removed.
* Addresses are compared case-insensitively; entries come back in append order ("oldest first").
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from attribution.storage.entries import CommitTx, Entry, State, Usage


class Journal(Protocol):
    async def append(self, usage: Usage) -> Entry:
        """Journals an answered request: RECORDED, or FREE for a free one. `DuplicateEntry` if its
        digest is already there, `InvalidJournalInput` if it breaks `entries.validate_usage`."""

    def append_blocking(self, usage: Usage) -> Entry:
        """`append` for a thread that is not running an event loop."""

    async def reserve(self, payer: str, low: int, high: int) -> None:
        """Accepts the payer's request interval `(low, high]` before serving it, for good (a request
        refused or failed later still consumes it). `IntervalConflict` names an overlapping one."""

    async def transition(self, digests: Collection[bytes], target: State, *, batch_id: int | None = None) -> int:
        """Moves the entries to `target` (`batch_id` exactly when BATCHED); the number that changed."""

    async def transition_batch(self, batch_id: int, target: State) -> int:
        """`transition` of every entry in the batch (0 for a batch with no entries)."""

    async def add_commit_tx(self, batch_id: int, tx_hash: bytes, nonce: int) -> CommitTx:
        """Journals a commit transaction signed for `batch_id` (a batch with BATCHED entries), before it is
        broadcast. Again with the same hash: a no-op; for another batch, or a malformed hash or nonce:
        `InvalidJournalInput`."""

    async def commit_txs(self, batch_id: int) -> list[CommitTx]:
        """The commit transactions journaled for `batch_id`, in the order they were journaled (kept for good,
        whatever becomes of the batch's entries)."""

    async def get(self, digest: bytes) -> Entry | None: ...

    async def in_state(self, state: State, limit: int = 1000) -> list[Entry]:
        """The oldest `limit` entries in `state`."""

    async def batch(self, batch_id: int) -> list[Entry]: ...

    async def depth(self) -> dict[State, int]:
        """How many entries are in each state (every state present)."""

    async def uncommitted_charge(self, payer: str) -> int:
        """Sum of the charges of the payer's RECORDED and BATCHED entries (the escrow not yet taken)."""

    async def highest_cap(self, payer: str) -> int:
        """The highest interval end (`cumulativeCap`) reserved for the payer; 0 if none."""

    async def voucher(self, payer: str) -> Entry | None:
        """The payer's journaled paid entry with the highest `cumulativeCap` (what commitBatch shows)."""

    async def due(self, deadline_at_most: int, limit: int = 1000) -> list[Entry]:
        """RECORDED and BATCHED entries whose request deadline is <= `deadline_at_most`, earliest
        deadline first: the submitter must commit them before `deadline + maxCommitDelay`."""

    async def close(self) -> None: ...
