"""Random sequences of appends, reservations, transitions, commit transactions and restarts, run against
both journals and a plain reference model written here (the lifecycle edges from the spec, overlap by
brute force): after every step each journal answers every query exactly as the model does."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from attribution.errors import DuplicateEntry, IllegalTransition, IntervalConflict, InvalidJournalInput
from attribution.storage import MemoryJournal, SqliteJournal, State
from tests.attribution.storage.factory import NOW, PAYERS, free, paid

R, B, C, F, V, X = (State.RECORDED, State.BATCHED, State.COMMITTED, State.FINALIZED, State.VOIDED, State.REFUNDED)
LEGAL = {(R, B), (R, X), (B, C), (B, R), (B, X), (C, F), (C, V), (C, B)}
TARGETS = st.sampled_from([R, B, C, F, V, X])


class JournalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="journal-model-"))
        self.journals = [MemoryJournal(), SqliteJournal(self.dir / "journal.db")]
        self.usages: dict[bytes, object] = {}  # digest -> usage, in append order
        self.states: dict[bytes, tuple[State, int | None]] = {}
        self.intervals: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
        self.commit_txs: dict[bytes, tuple[int, int]] = {}  # tx hash -> (batch, nonce), in journaling order
        self.next = 0

    def run(self, make_call) -> list[object]:
        """The call against every journal: each result, or the exception it raised."""

        async def one(journal):
            try:
                return await make_call(journal)
            except Exception as exc:
                return exc

        return [self.loop.run_until_complete(one(j)) for j in self.journals]

    def expect(self, make_call, result=None, error: type[Exception] | None = None) -> list[object]:
        outcomes = self.run(make_call)
        for outcome in outcomes:
            if error is None:
                assert not isinstance(outcome, Exception), outcome
                if result is not None:
                    assert outcome == result
            else:
                assert isinstance(outcome, error), outcome
        return outcomes

    @rule(payer=st.integers(0, 1), charge=st.integers(0, 10**30), ahead=st.integers(0, 100), is_free=st.booleans())
    def append(self, payer: int, charge: int, ahead: int, is_free: bool) -> None:
        usage = free(self.next) if is_free else paid(self.next, payer=payer, charge=charge, deadline=NOW + ahead)
        self.next += 1
        self.expect(lambda j: j.append(usage))
        self.usages[usage.digest] = usage
        self.states[usage.digest] = (State.FREE if is_free else R, None)

    @precondition(lambda self: self.usages)
    @rule(data=st.data())
    def append_again(self, data) -> None:
        usage = self.usages[data.draw(st.sampled_from(sorted(self.usages)))]
        self.expect(lambda j: j.append(usage), error=DuplicateEntry)

    @rule(payer=st.integers(0, 1), low=st.integers(0, 60), width=st.integers(1, 15))
    def reserve(self, payer: int, low: int, width: int) -> None:
        high = low + width
        overlapping = [(lo, hi) for lo, hi in self.intervals[payer] if lo < high and low < hi]
        if not overlapping:
            self.expect(lambda j: j.reserve(PAYERS[payer], low, high))
            self.intervals[payer].append((low, high))
            return
        for outcome in self.expect(lambda j: j.reserve(PAYERS[payer], low, high), error=IntervalConflict):
            assert outcome.existing == min(overlapping, key=lambda iv: iv[1])

    @precondition(lambda self: self.usages)
    @rule(data=st.data(), to=TARGETS, batch=st.integers(1, 3))
    def transition(self, data, to: State, batch: int) -> None:
        target = to
        digests = data.draw(st.lists(st.sampled_from(sorted(self.usages)), min_size=1, max_size=6))
        self._transition(digests, target, batch if target is B else None, lambda j: j.transition(
            digests, target, batch_id=batch if target is B else None))  # fmt: skip

    @rule(batch=st.integers(1, 3), to=TARGETS)
    def transition_batch(self, batch: int, to: State) -> None:
        target = to
        if target is B:
            self.expect(lambda j: j.transition_batch(batch, target), error=InvalidJournalInput)
            return
        digests = [d for d, (_, b) in self.states.items() if b == batch]
        self._transition(digests, target, None, lambda j: j.transition_batch(batch, target))

    def _transition(self, digests: list[bytes], target: State, batch_id: int | None, make_call) -> None:
        changed, illegal = [], False
        for d in dict.fromkeys(digests):
            state, batch = self.states[d]
            if state is target and (target is not B or batch == batch_id):
                continue
            illegal |= (state, target) not in LEGAL or (state is C and target is B and batch != batch_id)
            changed.append(d)
        if illegal:
            self.expect(make_call, error=IllegalTransition)
            return
        self.expect(make_call, result=len(changed))
        for d in changed:
            kept = self.states[d][1]
            self.states[d] = (target, batch_id if target is B else None if target is R else kept)

    @rule(batch=st.integers(1, 3), tx=st.integers(0, 5), nonce=st.integers(0, 3))
    def add_commit_tx(self, batch: int, tx: int, nonce: int) -> None:
        tx_hash = bytes([tx]) * 32
        known = self.commit_txs.get(tx_hash)
        if known is not None:
            if known[0] == batch:
                for outcome in self.expect(lambda j: j.add_commit_tx(batch, tx_hash, nonce)):
                    assert (outcome.batch_id, outcome.nonce) == known  # the first one journaled stays
            else:
                self.expect(lambda j: j.add_commit_tx(batch, tx_hash, nonce), error=InvalidJournalInput)
            return
        if not any(s is B and b == batch for s, b in self.states.values()):
            self.expect(lambda j: j.add_commit_tx(batch, tx_hash, nonce), error=InvalidJournalInput)
            return
        self.expect(lambda j: j.add_commit_tx(batch, tx_hash, nonce))
        self.commit_txs[tx_hash] = (batch, nonce)

    @rule()
    def restart(self) -> None:
        self.loop.run_until_complete(self.journals[1].close())
        self.journals[1] = SqliteJournal(self.dir / "journal.db")

    @invariant()
    def answers_match_the_model(self) -> None:
        order = list(self.usages)
        for state in State:
            expected = [self.usages[d] for d in order if self.states[d][0] is state]
            self.expect(lambda j, s=state: _usages(j.in_state(s, 10**6)), result=expected)
        depth = {s: sum(st_ is s for st_, _ in self.states.values()) for s in State}
        self.expect(lambda j: j.depth(), result=depth)
        for batch in (1, 2, 3):
            expected = [self.usages[d] for d in order if self.states[d][1] == batch]
            self.expect(lambda j, b=batch: _usages(j.batch(b)), result=expected)
            txs = [(h, n) for h, (b, n) in self.commit_txs.items() if b == batch]
            self.expect(lambda j, b=batch: _txs(j.commit_txs(b)), result=txs)
        for payer in (0, 1):
            paid_ = [
                self.usages[d]
                for d in order
                if not self.usages[d].free and self.usages[d].request.payer == PAYERS[payer]
            ]
            uncommitted = sum(u.record.charge for u in paid_ if self.states[u.digest][0] in (R, B))
            self.expect(lambda j, p=payer: j.uncommitted_charge(PAYERS[p]), result=uncommitted)
            self.expect(
                lambda j, p=payer: j.highest_cap(PAYERS[p]),
                result=max((h for _, h in self.intervals[payer]), default=0),
            )
            voucher = max(paid_, key=lambda u: u.request.cumulative_cap, default=None)
            for outcome in self.run(lambda j, p=payer: j.voucher(PAYERS[p])):
                assert (outcome and outcome.usage) == voucher
        due = [
            self.usages[d] for d in order if self.states[d][0] in (R, B) and self.usages[d].request.deadline <= NOW + 50
        ]
        due.sort(key=lambda u: u.request.deadline)
        self.expect(lambda j: _usages(j.due(NOW + 50)), result=due)

    def teardown(self) -> None:
        for journal in self.journals:
            self.loop.run_until_complete(journal.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def _usages(entries_call) -> list[object]:
    return [e.usage for e in await entries_call]


async def _txs(commit_txs_call) -> list[tuple[bytes, int]]:
    return [(t.tx_hash, t.nonce) for t in await commit_txs_call]


JournalModel.TestCase.settings = settings(
    max_examples=20, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestJournalModel = JournalModel.TestCase
