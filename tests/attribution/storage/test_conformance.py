"""One suite, every `Journal`: appends, the state machine, the pipeline's queries and the interval set.

The lifecycle is spelled out here on its own (`LEGAL`), from the spec and issue 10, rather than read
from `entries.TRANSITIONS`, so a wrong table fails these tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from attribution.errors import (
    DuplicateEntry,
    IllegalTransition,
    IntervalConflict,
    InvalidJournalInput,
    JournalClosed,
    UnknownEntry,
)
from attribution.storage import Journal, State
from tests.attribution.storage.factory import NOW, PAYERS, free, paid

R, B, C, F, V, X = (State.RECORDED, State.BATCHED, State.COMMITTED, State.FINALIZED, State.VOIDED, State.REFUNDED)
LEGAL = {(R, B), (R, X), (B, C), (B, R), (B, X), (C, F), (C, V), (C, B)}  # C -> B: into its own batch only
PAID_STATES = (R, B, C, F, V, X)
# how a fresh RECORDED entry reaches each state (batch 1 on the way)
PATH = {R: [], B: [B], C: [B, C], F: [B, C, F], V: [B, C, V], X: [X]}


async def move(journal: Journal, digest: bytes, path: list[State]) -> None:
    for step in path:
        await journal.transition([digest], step, batch_id=1 if step is B else None)


# appends


async def test_append_returns_and_stores_the_entry(journal: Journal) -> None:
    before = time.time()
    entry = await journal.append(paid(0))
    assert (entry.usage, entry.state, entry.batch_id) == (paid(0), R, None)
    assert before <= entry.recorded_at == entry.updated_at <= time.time()
    assert await journal.get(paid(0).digest) == entry
    assert await journal.get(b"\0" * 32) is None


async def test_free_entry_is_free_from_the_start(journal: Journal) -> None:
    entry = await journal.append(free(0))
    assert (entry.usage, entry.state, entry.batch_id) == (free(0), State.FREE, None)
    assert await journal.get(free(0).digest) == entry
    assert await journal.in_state(R) == []


async def test_uint128_amounts_round_trip(journal: Journal) -> None:
    top = (1 << 128) - 1
    usage = paid(0, charge=top, max_charge=top, cumulative_cap=top)
    await journal.append(usage)
    assert (await journal.get(usage.digest)).usage == usage
    assert await journal.uncommitted_charge(PAYERS[0]) == top


async def test_duplicate_digest_is_refused_and_the_first_kept(journal: Journal) -> None:
    first = await journal.append(paid(0))
    with pytest.raises(DuplicateEntry, match=paid(0).digest.hex()):
        await journal.append(dataclasses.replace(paid(0), adapter="another"))
    with pytest.raises(DuplicateEntry):
        await journal.append(dataclasses.replace(free(0), record=dataclasses.replace(paid(0).record, charge=0)))
    assert await journal.get(paid(0).digest) == first
    assert (await journal.depth())[R] == 1


def _bad(usage, **record_or_request):
    request_changes = {k: v for k, v in record_or_request.items() if k in ("adapter_id", "deadline", "payer")}
    record_changes = {k: v for k, v in record_or_request.items() if k not in request_changes}
    return dataclasses.replace(
        usage,
        request=dataclasses.replace(usage.request, **request_changes) if request_changes else usage.request,
        record=dataclasses.replace(usage.record, **record_changes) if record_changes else usage.record,
    )


BIG = 1 << 63
INVALID = {
    "short digest": _bad(paid(0), request_digest=b"\1" * 31),
    "paid, no payer signature": dataclasses.replace(paid(0), request_signature=None),
    "paid, no node signature": dataclasses.replace(paid(0), record_signature=None),
    "free with a charge of 1": dataclasses.replace(free(0), record=dataclasses.replace(free(0).record, charge=1)),
    "free with a payer signature": dataclasses.replace(free(0), request_signature=paid(0).request_signature),
    "payer not an address": _bad(paid(0), payer="0x1234"),
    "deadline 2**63": _bad(paid(0), deadline=BIG),
    "adapter id 2**63": _bad(paid(0), adapter_id=BIG),
    "served at 2**63": _bad(paid(0), served_at=BIG),
    "charge 2**128": _bad(paid(0), charge=1 << 128),
    "negative charge": _bad(paid(0), charge=-1),
}


@pytest.mark.parametrize("usage", INVALID.values(), ids=INVALID.keys())
async def test_malformed_entries_are_refused(journal: Journal, usage) -> None:
    with pytest.raises(InvalidJournalInput):
        await journal.append(usage)
    assert sum((await journal.depth()).values()) == 0


async def test_largest_storable_values_are_accepted(journal: Journal) -> None:
    usage = _bad(paid(0), deadline=BIG - 1, adapter_id=BIG - 1, served_at=BIG - 1)
    await journal.append(usage)
    assert (await journal.get(usage.digest)).usage == usage


# the state machine


async def test_every_transition(journal: Journal) -> None:
    pairs = [(start, target) for start in PAID_STATES for target in PAID_STATES]
    for k, (start, target) in enumerate(pairs):
        digest = paid(k).digest
        await journal.append(paid(k))
        await move(journal, digest, PATH[start])
        before = await journal.get(digest)
        batch_id = (1 if start is C else 2) if target is B else None
        if (start, target) in LEGAL:
            assert await journal.transition([digest], target, batch_id=batch_id) == 1, (start, target)
            after = await journal.get(digest)
            assert after.state is target and after.updated_at >= before.updated_at
            assert after.batch_id == {B: batch_id, R: None}.get(target, before.batch_id), (start, target)
            assert await journal.transition([digest], target, batch_id=batch_id) == 0, (start, target)  # idempotent
        elif start is target and target is not B:
            assert await journal.transition([digest], target) == 0, (start, target)
            assert await journal.get(digest) == before
        else:
            with pytest.raises(IllegalTransition, match=f"is {start}"):
                await journal.transition([digest], target, batch_id=batch_id)
            assert await journal.get(digest) == before, (start, target)


async def test_rebatching_into_the_same_batch_is_a_no_op_and_into_another_is_refused(journal: Journal) -> None:
    await journal.append(paid(0))
    assert await journal.transition([paid(0).digest], B, batch_id=1) == 1
    assert await journal.transition([paid(0).digest], B, batch_id=1) == 0
    with pytest.raises(IllegalTransition, match="batched in batch 1: it cannot become batched in batch 2"):
        await journal.transition([paid(0).digest], B, batch_id=2)


async def test_a_reorged_commit_goes_back_into_its_own_batch_only(journal: Journal) -> None:
    """The chain lost a batch's commit (a reorg): its entries are BATCHED again in that batch, whose commit
    transactions the journal holds; in another batch one of those could still commit them a second time."""
    await journal.append(paid(0))
    await move(journal, paid(0).digest, PATH[C])
    with pytest.raises(IllegalTransition, match="committed in batch 1: it cannot become batched in batch 2"):
        await journal.transition([paid(0).digest], B, batch_id=2)
    assert await journal.transition([paid(0).digest], B, batch_id=1) == 1
    assert (await journal.get(paid(0).digest)).batch_id == 1
    assert await journal.uncommitted_charge(PAYERS[0]) == 600  # the chain has not taken it (any more)


@pytest.mark.parametrize("target", [*PAID_STATES, State.FREE], ids=str)
async def test_free_entries_never_move(journal: Journal, target: State) -> None:
    await journal.append(free(0))
    with pytest.raises((IllegalTransition, InvalidJournalInput)):
        await journal.transition([free(0).digest], target, batch_id=1 if target is B else None)
    assert (await journal.get(free(0).digest)).state is State.FREE


async def test_a_transition_applies_to_all_or_none(journal: Journal) -> None:
    for i in range(3):
        await journal.append(paid(i))
    await move(journal, paid(1).digest, PATH[C])
    with pytest.raises(IllegalTransition, match=paid(1).digest.hex()):
        await journal.transition([paid(0).digest, paid(1).digest, paid(2).digest], B, batch_id=5)
    assert [e.state for e in [await journal.get(paid(i).digest) for i in range(3)]] == [R, C, R]
    with pytest.raises(UnknownEntry, match="1 request"):
        await journal.transition([paid(0).digest, b"\7" * 32], B, batch_id=5)
    assert (await journal.get(paid(0).digest)).state is R


async def test_batch_id_is_given_exactly_when_batching(journal: Journal) -> None:
    await journal.append(paid(0))
    with pytest.raises(InvalidJournalInput):
        await journal.transition([paid(0).digest], B)
    with pytest.raises(InvalidJournalInput):
        await journal.transition([paid(0).digest], X, batch_id=1)
    with pytest.raises(InvalidJournalInput):
        await journal.transition_batch(1, B)


async def test_whole_batches_move_together(journal: Journal) -> None:
    for i in range(5):
        await journal.append(paid(i))
    assert await journal.transition([paid(i).digest for i in (0, 1, 2)], B, batch_id=1) == 3
    assert await journal.transition([paid(i).digest for i in (3, 4)], B, batch_id=2) == 2
    assert [e.usage for e in await journal.batch(1)] == [paid(0), paid(1), paid(2)]
    assert await journal.transition_batch(1, C) == 3
    assert await journal.transition_batch(1, C) == 0
    assert await journal.transition_batch(1, F) == 3
    assert {e.state for e in await journal.batch(1)} == {F}
    assert {e.state for e in await journal.batch(2)} == {B}
    assert await journal.transition_batch(99, C) == 0
    # batch 2 is abandoned: its entries are RECORDED again, in no batch, and can be batched anew
    assert await journal.transition_batch(2, R) == 2
    assert await journal.batch(2) == []
    assert [(e.state, e.batch_id) for e in await journal.in_state(R)] == [(R, None), (R, None)]
    assert await journal.transition([paid(3).digest, paid(4).digest], B, batch_id=3) == 2
    with pytest.raises(IllegalTransition):
        await journal.transition_batch(3, F)


# commit transactions (written before each is broadcast)

TX = [bytes([i]) * 32 for i in range(4)]


async def test_commit_txs_are_kept_per_batch_in_send_order(journal: Journal) -> None:
    for i in range(3):
        await journal.append(paid(i))
    await journal.transition([paid(0).digest, paid(1).digest], B, batch_id=1)
    await journal.transition([paid(2).digest], B, batch_id=2)
    before = time.time()
    first = await journal.add_commit_tx(1, TX[2], 7)
    assert (first.batch_id, first.tx_hash, first.nonce) == (1, TX[2], 7) and before <= first.sent_at <= time.time()
    await journal.add_commit_tx(2, TX[0], 8)
    await journal.add_commit_tx(1, TX[1], 7)  # a fee-bumped version: same nonce
    assert await journal.add_commit_tx(1, TX[2], 7) == first  # again: a no-op
    assert [(t.tx_hash, t.nonce) for t in await journal.commit_txs(1)] == [(TX[2], 7), (TX[1], 7)]
    assert [t.tx_hash for t in await journal.commit_txs(2)] == [TX[0]]
    assert await journal.commit_txs(3) == []
    # whatever becomes of the entries, the transactions stay: one may still be mined
    await journal.transition_batch(1, C)
    await journal.transition_batch(2, R)
    assert [t.tx_hash for t in await journal.commit_txs(1)] == [TX[2], TX[1]]
    assert [t.tx_hash for t in await journal.commit_txs(2)] == [TX[0]]


async def test_a_commit_tx_needs_a_batch_being_committed(journal: Journal) -> None:
    """Only a batch with BATCHED entries is sent; a transaction journaled for any other is a submitter bug."""
    await journal.append(paid(0))
    with pytest.raises(InvalidJournalInput, match="batch 1 has no batched entries"):
        await journal.add_commit_tx(1, TX[0], 0)  # no such batch
    await move(journal, paid(0).digest, PATH[C])
    with pytest.raises(InvalidJournalInput, match="batch 1 has no batched entries"):
        await journal.add_commit_tx(1, TX[0], 0)  # committed already
    assert await journal.commit_txs(1) == []


async def test_one_transaction_commits_one_batch(journal: Journal) -> None:
    for i in range(2):
        await journal.append(paid(i))
        await journal.transition([paid(i).digest], B, batch_id=i + 1)
    await journal.add_commit_tx(1, TX[0], 3)
    with pytest.raises(InvalidJournalInput, match=f"0x{TX[0].hex()} is journaled for batch 1"):
        await journal.add_commit_tx(2, TX[0], 3)
    assert await journal.commit_txs(2) == []


@pytest.mark.parametrize(
    ("tx_hash", "nonce"), [(b"\1" * 31, 0), (b"\1" * 33, 0), (b"\1" * 32, -1), (b"\1" * 32, 1 << 63)],
    ids=["hash 31 bytes", "hash 33 bytes", "nonce -1", "nonce 2**63"],
)
async def test_malformed_commit_txs_are_refused(journal: Journal, tx_hash: bytes, nonce: int) -> None:
    await journal.append(paid(0))
    await journal.transition([paid(0).digest], B, batch_id=1)
    with pytest.raises(InvalidJournalInput):
        await journal.add_commit_tx(1, tx_hash, nonce)
    assert await journal.commit_txs(1) == []
    await journal.add_commit_tx(1, b"\1" * 32, (1 << 63) - 1)  # the largest storable nonce


# the pipeline's queries


@pytest.mark.parametrize("limit", [0, 4, 5, 6])
async def test_in_state_is_oldest_first_up_to_limit(journal: Journal, limit: int) -> None:
    for i in (4, 0, 3, 1, 2):  # append order, not digest or index order
        await journal.append(paid(i))
    await journal.append(free(0))
    assert [e.usage for e in await journal.in_state(R, limit)] == [paid(i) for i in (4, 0, 3, 1, 2)][:limit]
    await journal.transition([paid(0).digest, paid(1).digest], B, batch_id=1)
    assert [e.usage for e in await journal.in_state(R)] == [paid(4), paid(3), paid(2)]
    assert [e.usage for e in await journal.in_state(B)] == [paid(0), paid(1)]
    assert [e.usage for e in await journal.in_state(State.FREE)] == [free(0)]
    with pytest.raises(InvalidJournalInput):
        await journal.in_state(R, -1)


async def test_depth_counts_every_state(journal: Journal) -> None:
    assert await journal.depth() == dict.fromkeys(State, 0)
    for i, state in enumerate([R, R, B, C, C, C, F, V, X]):
        await journal.append(paid(i))
        await move(journal, paid(i).digest, PATH[state])
    await journal.append(free(0))
    assert await journal.depth() == {R: 2, B: 1, C: 3, F: 1, V: 1, X: 1, State.FREE: 1}


async def test_uncommitted_charge_sums_recorded_and_batched_per_payer(journal: Journal) -> None:
    states = [R, B, C, F, V, X, R]
    for i, state in enumerate(states):
        await journal.append(paid(i, charge=10**i))
        await move(journal, paid(i).digest, PATH[state])
    await journal.append(paid(7, payer=1, charge=5))
    await journal.append(free(0))
    assert await journal.uncommitted_charge(PAYERS[0]) == 1 + 10 + 10**6
    assert await journal.uncommitted_charge(PAYERS[0].lower()) == 1 + 10 + 10**6
    assert await journal.uncommitted_charge(PAYERS[1]) == 5
    assert await journal.uncommitted_charge("0x" + "44" * 20) == 0
    with pytest.raises(InvalidJournalInput):
        await journal.uncommitted_charge("not an address")


async def test_voucher_is_the_highest_cap_request(journal: Journal) -> None:
    assert await journal.voucher(PAYERS[0]) is None
    usages = [paid(i, cumulative_cap=cap) for i, cap in enumerate([3_000, 9_000, 5_000])]
    for usage in usages:
        await journal.append(usage)
    await journal.append(paid(3, payer=1, cumulative_cap=50_000))
    await journal.append(free(0))
    await move(journal, usages[1].digest, PATH[F])  # any state: a finalized request still authorises its cap
    assert (await journal.voucher(PAYERS[0].upper().replace("0X", "0x"))).usage == usages[1]
    assert (await journal.voucher(PAYERS[1])).usage == paid(3, payer=1, cumulative_cap=50_000)


async def test_due_lists_uncommitted_entries_by_deadline(journal: Journal) -> None:
    deadlines = {0: NOW + 30, 1: NOW + 10, 2: NOW + 20, 3: NOW + 10, 4: NOW + 5}
    usages = {i: paid(i, deadline=deadline) for i, deadline in deadlines.items()}
    for usage in usages.values():
        await journal.append(usage)
    await move(journal, usages[2].digest, PATH[B])
    await move(journal, usages[4].digest, PATH[C])  # committed: no longer due
    await journal.append(free(0))

    async def due(deadline_at_most: int, limit: int = 1000) -> list[int]:
        index = {u.digest: i for i, u in usages.items()}
        return [index[e.usage.digest] for e in await journal.due(deadline_at_most, limit)]

    assert await due(NOW + 9) == []
    assert await due(NOW + 10) == [1, 3]  # equal deadlines: append order
    assert await due(NOW + 19) == [1, 3]
    assert await due(NOW + 20) == [1, 3, 2]
    assert await due(NOW + 100, limit=2) == [1, 3]
    assert await due(1 << 64) == [1, 3, 2, 0]


# the accepted request intervals


async def test_reserve_refuses_every_overlap_and_only_overlaps(journal: Journal) -> None:
    payer = PAYERS[0]
    await journal.reserve(payer, 100, 200)
    await journal.reserve(payer, 300, 400)
    for low, high in [(99, 100), (200, 250), (250, 300), (0, 1), (400, 401), (98, 99)]:  # touching is no overlap
        await journal.reserve(payer, low, high)
    for low, high, existing in [
        (150, 160, (100, 200)), (199, 200, (100, 200)), (100, 200, (100, 200)), (99, 101, (99, 100)),
        (0, 1000, (0, 1)), (249, 251, (200, 250)), (299, 301, (250, 300)), (399, 401, (300, 400)),
        (400, 401, (400, 401)),
    ]:  # fmt: skip
        with pytest.raises(IntervalConflict) as info:
            await journal.reserve(payer, low, high)
        assert (info.value.requested, info.value.existing) == ((low, high), existing)
        assert f"({existing[0]}, {existing[1]}]" in str(info.value)
    await journal.reserve(PAYERS[1], 100, 200)  # intervals are per payer
    with pytest.raises(IntervalConflict):
        await journal.reserve(PAYERS[1].lower(), 150, 250)


@pytest.mark.parametrize(
    ("low", "high"), [(5, 5), (6, 5), (-1, 5), (0, 1 << 128)], ids=["empty", "reversed", "negative", "over uint128"]
)
async def test_reserve_refuses_malformed_intervals(journal: Journal, low: int, high: int) -> None:
    with pytest.raises(InvalidJournalInput):
        await journal.reserve(PAYERS[0], low, high)
    await journal.reserve(PAYERS[0], 0, (1 << 128) - 1)  # the widest one is fine


async def test_highest_cap_is_the_highest_reserved_interval_end(journal: Journal) -> None:
    assert await journal.highest_cap(PAYERS[0]) == 0
    for low, high in [(1000, 2000), (0, 1000), (5000, 6000), (2000, 3000)]:
        await journal.reserve(PAYERS[0], low, high)
    assert await journal.highest_cap(PAYERS[0]) == 6000
    assert await journal.highest_cap(PAYERS[0].lower()) == 6000
    assert await journal.highest_cap(PAYERS[1]) == 0


async def test_concurrent_reservations_of_one_interval_accept_exactly_one(journal: Journal) -> None:
    results = await asyncio.gather(*(journal.reserve(PAYERS[0], 10, 20) for _ in range(20)), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, IntervalConflict) for r in results if r is not None)


# concurrency and closing


async def test_tasks_and_threads_append_concurrently(journal: Journal) -> None:
    def appender(start: int) -> None:
        for i in range(start, start + 25):
            journal.append_blocking(paid(i))

    threads = [threading.Thread(target=appender, args=(1000 + 100 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    entries = await asyncio.gather(*(journal.append(paid(i)) for i in range(200)))
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert [e.usage for e in entries] == [paid(i) for i in range(200)]
    assert (await journal.depth())[R] == 300
    everything = {e.usage.digest for e in await journal.in_state(R, 1000)}
    expected = {paid(i).digest for i in range(200)} | {
        paid(1000 + 100 * t + k).digest for t in range(4) for k in range(25)
    }
    assert everything == expected


async def test_a_closed_journal_refuses_writes(journal: Journal) -> None:
    await journal.append(paid(0))
    await journal.close()
    with pytest.raises(JournalClosed):
        await journal.append(paid(1))
    with pytest.raises(JournalClosed):
        await journal.reserve(PAYERS[0], 0, 1)
    with pytest.raises(JournalClosed):
        await journal.get(paid(0).digest)
    with pytest.raises(JournalClosed):
        await journal.add_commit_tx(1, TX[0], 0)
    with pytest.raises(JournalClosed):
        await journal.commit_txs(1)
    await journal.close()  # closing twice is fine
