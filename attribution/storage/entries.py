"""What the journal holds: one entry per answered request, its lifecycle, and the rules every
implementation shares (validation, the transition table, interval checks).

Lifecycle of a paid entry (`TRANSITIONS` is the table):

    RECORDED --batch--> BATCHED --commit--> COMMITTED --finalize--> FINALIZED
        |                 | |  ^                |  \\
        |                 | |  `----reorged-----'   `--> VOIDED   (a fraud proof voided the batch on chain;
        |                 | |  (the chain lost the commit:         the contract refunded the payers)
        |                 | |   back into the same batch)
        |                 | `--> RECORDED   (batch abandoned: only when the chain is known not to hold it
        |                 |                  and none of its commit transactions can still be mined)
        `-----------------+--> REFUNDED   (the node dropped the charge before the chain took it: a
                                           commit deadline passed, a client gone mid-stream)

A free entry (an unsigned request served under `--allow-unsigned`) is FREE from the start, charges
0 and never changes state, so it can never go into a batch.

Besides the entries, the journal holds every commit transaction the submitter signs for a batch (`CommitTx`:
its hash and nonce, each fee-bumped version too), written before the transaction is broadcast: after a
crash or a reorg, the receipts of these hashes say whether the batch reached the chain (docs/architecture.md,
"Submitter restart safety").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from attribution.errors import IllegalTransition, InvalidJournalInput, UnknownEntry
from attribution.types import InferenceRequest, Signature, UsageRecord

MAX_INT64 = (1 << 63) - 1  # SQLite's INTEGER: uint64 fields (adapterId, deadline, servedAt) must fit
MAX_UINT128 = (1 << 128) - 1


class State(StrEnum):
    RECORDED = "recorded"
    BATCHED = "batched"
    COMMITTED = "committed"
    FINALIZED = "finalized"
    VOIDED = "voided"
    REFUNDED = "refunded"
    FREE = "free"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.RECORDED: frozenset({State.BATCHED, State.REFUNDED}),
    State.BATCHED: frozenset({State.COMMITTED, State.RECORDED, State.REFUNDED}),
    State.COMMITTED: frozenset({State.FINALIZED, State.VOIDED, State.BATCHED}),  # BATCHED: its own batch only
    State.FINALIZED: frozenset(),
    State.VOIDED: frozenset(),
    State.REFUNDED: frozenset(),
    State.FREE: frozenset(),
}
UNCOMMITTED = (State.RECORDED, State.BATCHED)  # charges the chain has not taken from the escrow yet


@dataclass(frozen=True, slots=True)
class Usage:
    """One answered request as the node appends it. `request` and `request_signature` are None for
    a free entry; `record.request_digest` is the entry's unique key (a free entry's is node-chosen)."""

    request: InferenceRequest | None
    request_signature: Signature | None
    record: UsageRecord
    record_signature: Signature | None
    adapter: str  # the adapter's CID or name as served; "" for the base model

    @property
    def digest(self) -> bytes:
        return self.record.request_digest

    @property
    def free(self) -> bool:
        return self.request is None


@dataclass(frozen=True, slots=True)
class CommitTx:
    """A commit transaction the submitter signed for a local batch, journaled before it was broadcast.
    `sent_at` (unix seconds) is set by the journal."""

    batch_id: int
    tx_hash: bytes
    nonce: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class Entry:
    """A journaled `Usage` with its state. Times are unix seconds set by the journal."""

    usage: Usage
    state: State
    batch_id: int | None
    recorded_at: float
    updated_at: float


def validate_usage(usage: Usage) -> None:
    """The journal's own rules for an entry (signatures are checked before, by `attribution.checks`)."""
    if len(usage.digest) != 32:
        raise InvalidJournalInput(f"request digest must be 32 bytes, got {len(usage.digest)}")
    if usage.free:
        if usage.request_signature is not None:
            raise InvalidJournalInput("a free entry carries no request signature")
        if usage.record.charge != 0:
            raise InvalidJournalInput(f"a free entry charges 0, got {usage.record.charge}")
    else:
        if usage.request_signature is None or usage.record_signature is None:
            raise InvalidJournalInput("a paid entry needs the payer's and the node's signatures")
        address_key(usage.request.payer)
        _check_range(usage.request, ("adapter_id", "deadline"), MAX_INT64)
        _check_range(usage.request, ("max_charge", "cumulative_cap"), MAX_UINT128)
    _check_range(usage.record, ("served_at",), MAX_INT64)
    _check_range(usage.record, ("adapter_amount", "charge"), MAX_UINT128)


def _check_range(struct: object, names: tuple[str, ...], top: int) -> None:
    for name in names:
        value = getattr(struct, name)
        if not 0 <= value <= top:
            raise InvalidJournalInput(f"{name} {value} is outside 0..{top} (what the journal stores)")


def address_key(address: str) -> bytes:
    """The 20 bytes of a 0x address: how journals compare payers (case-insensitively)."""
    try:
        key = bytes.fromhex(address.removeprefix("0x").removeprefix("0X"))
    except ValueError:
        key = b""
    if len(key) != 20:
        raise InvalidJournalInput(f"not a 20-byte hex address: {address!r}")
    return key


def check_interval(low: int, high: int) -> None:
    """A request's interval `(low, high]` = `(cumulativeCap - maxCharge, cumulativeCap]`: non-empty, uint128."""
    if not 0 <= low < high <= MAX_UINT128:
        raise InvalidJournalInput(f"interval ({low}, {high}] is not a non-empty uint128 interval")


def check_commit_tx(tx_hash: bytes, nonce: int) -> None:
    if len(tx_hash) != 32:
        raise InvalidJournalInput(f"a transaction hash is 32 bytes, got {len(tx_hash)}")
    if not 0 <= nonce <= MAX_INT64:
        raise InvalidJournalInput(f"nonce {nonce} is outside 0..{MAX_INT64} (what the journal stores)")


def journaled_again(known: CommitTx, batch_id: int) -> CommitTx:
    """A commit transaction journaled again: a no-op for its batch, an error for another (a transaction commits
    one batch)."""
    if known.batch_id != batch_id:
        raise InvalidJournalInput(f"transaction 0x{known.tx_hash.hex()} is journaled for batch {known.batch_id}")
    return known


def check_limit(limit: int) -> None:
    if limit < 0:
        raise InvalidJournalInput(f"limit must be >= 0, got {limit}")


def check_target(target: State, batch_id: int | None) -> None:
    if target is State.FREE:
        raise InvalidJournalInput("no entry can become free")
    if (target is State.BATCHED) != (batch_id is not None):
        raise InvalidJournalInput("a batch id is given exactly when entries become batched")


def plan_transition(
    current: dict[bytes, tuple[State, int | None]], digests: Iterable[bytes], target: State, batch_id: int | None
) -> list[bytes]:
    """The digests that change when `digests` go to `target` (in batch `batch_id` if BATCHED), given
    each one's current (state, batch). Already there: a no-op. Raises before anything is changed:
    UnknownEntry if a digest is missing, IllegalTransition for the first one that may not move."""
    check_target(target, batch_id)
    digests = list(dict.fromkeys(digests))
    missing = [d for d in digests if d not in current]
    if missing:
        raise UnknownEntry(missing)
    changes = []
    for d in digests:
        state, batch = current[d]
        if state is target and (target is not State.BATCHED or batch == batch_id):
            continue
        # a commit the chain lost (a reorg) sends the entries back to BATCHED in their own batch, whose commit
        # transactions the journal holds; into another batch, one of those could still commit them
        moved = state is State.COMMITTED and target is State.BATCHED and batch != batch_id
        if target not in TRANSITIONS[state] or moved:
            raise IllegalTransition(d, state.value, batch, target.value, batch_id)
        changes.append(d)
    return changes


def batch_after(batch: int | None, target: State, batch_id: int | None) -> int | None:
    """An entry's batch after a transition: set when batched, cleared when the batch is abandoned."""
    if target is State.BATCHED:
        return batch_id
    return None if target is State.RECORDED else batch
