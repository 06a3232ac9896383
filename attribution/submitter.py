"""The submitter: journaled records -> batch files on IPFS -> commits on chain -> finalized payments.

One loop per node (`run`). Each pass:

1. **Drop what can no longer be committed.** A record must be committed before its request's
   `deadline + maxCommitDelay` (later the contract would call it fraud); a RECORDED entry within `margin`
   of that is REFUNDED (never charged) instead of risking a slashable commit.
2. **Batch.** When `max_records` wait, the oldest has waited `interval`, or one comes close to its commit
   deadline: take the oldest RECORDED entries (at most `max_records`), mark them BATCHED under a fresh local
   batch number (durably, before anything is sent: the journal is the write-ahead log), build the honest
   batch (`attribution.aggregation.build_batch`, each payer's voucher = the highest-cap request it ever
   signed for us), write the batch file and publish it to IPFS.
3. **Commit** the batch (`UsageSettlement.commitBatch`; every signed version of the transaction journaled
   before it is broadcast), wait for `confirmations` (and that the commit is still mined then), mark it
   COMMITTED.
4. **Finalize** committed batches whose challenge window has ended (anyone may; the node does it for its
   own), mark them FINALIZED; a batch the chain reports voided becomes VOIDED; a chain batch id that no
   longer holds this batch (a reorg) fails the pass, and recovery sorts it out.

Restart safety (threats and defences: docs/architecture.md, "Submitter restart safety"): every commit
transaction, each fee-bumped version too, is journaled (hash, nonce) before it is broadcast. A BATCHED group
may or may not have reached the chain when the node died; a COMMITTED one may have lost its commit to a reorg
deeper than `confirmations`. `recover` waits for the sender's pending transactions, then asks
`attribution.recovery.CommitLocator` about each group: committed (a confirmed receipt of one of its own
transactions, checked against the contract's state), or provably never to be (every one of its nonces taken
by another transaction, a free one retired first). Event logs are never asked: a provider that drops them
would make the node commit again, a slashable duplicate. A group the chain does not hold is committed again
(the same leaves, so the same root; a reorged one back to BATCHED first, logged as an error), less any record
whose commit deadline has passed meanwhile: those are REFUNDED and the rest go back to RECORDED for the next
batch (a late commit is fraud, whoever's fault the delay was; each commit also carries `commitBy`, its first
record's commit deadline, and the contract refuses it later, so a commit held back in a mempool cannot land
late even when its cancellation fails). A record is therefore committed exactly once, in time, or refunded;
never lost. Chain and IPFS failures are retried with exponential backoff (1 s doubling to 60 s), recovery
first; serving goes on meanwhile.

The protocol has no interactive challenge for the node to answer: a fraud proof either succeeds (the node
cheated) or reverts, so an honest node only has to commit in time and finalize.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount

from attribution.aggregation import Batch, BatchLeaf, Voucher, build_batch
from attribution.errors import AttributionError, ChainError, SignatureError
from attribution.recovery import CommitLocator
from attribution.signing import recover
from attribution.storage import Entry, State
from attribution.types import Domain

log = logging.getLogger(__name__)

Publish = Callable[[Path], Awaitable[str]]  # a batch file on disk -> its IPFS CID

STATUS_PENDING, STATUS_FINALIZED, STATUS_VOIDED = 1, 2, 3


@dataclass
class SubmitterStats:
    """Counters the metrics endpoint reads."""

    committed: int = 0
    finalized: int = 0
    voided: int = 0
    refunded_records: int = 0
    chain_errors: int = 0
    last_error: str = ""
    last_commit_at: float = 0.0
    ids: dict[int, int] = field(default_factory=dict)  # local batch number -> chain batch id


class Submitter:
    def __init__(
        self,
        *,
        journal: Any,
        contracts: Any,
        sender: LocalAccount,
        node: str,
        publish: Publish,
        batch_dir: Path,
        max_records: int,
        interval: float,
        max_commit_delay: int,
        challenge_window: int,
        confirmations: int = 1,
        margin: int = 60,
        status_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
        on_collected: Callable[[Mapping[str, int]], None] | None = None,
    ) -> None:
        """`on_collected(charges)` (payer -> wei) hears of each commit mined, before the journal marks its
        records COMMITTED: the node's cached escrow balances must stop showing what it took
        (`attribution.ledger.ChainLedger.collected`)."""
        self.journal = journal
        self.contracts = contracts
        self.chain = contracts.settlement.chain
        self.sender = sender
        self.node = node
        self.publish = publish
        self.batch_dir = batch_dir
        self.max_records = max_records
        self.interval = interval
        self.max_commit_delay = max_commit_delay
        self.challenge_window = challenge_window
        self.confirmations = confirmations
        self.margin = margin
        self.domain = Domain(self.chain.chain_id, contracts.settlement.address)
        self.clock = clock
        self.on_collected = on_collected
        self.stats = SubmitterStats()
        self._last_number = 0
        self._wake = asyncio.Event()
        # Committed batches still open: local number -> chain time at which their challenge window ends
        # (0: not read yet). Only these are asked about, and only when due or every `status_interval`.
        self._open: dict[int, int] = {}
        self._roots: dict[int, bytes] = {}  # payer root of each open batch: what its chain batch id must hold
        self.status_interval = status_interval
        self._statuses_read_at = -math.inf

    def notify(self) -> None:
        """A record was journaled: the loop re-checks whether a batch is due (cheap)."""
        self._wake.set()

    async def run(self) -> None:
        """Forever: recover, then step every second or when notified; failures back off and retry."""
        backoff = 1.0
        recovered = False
        while True:
            try:
                if not recovered:
                    await self.recover()
                    recovered = True
                await self.step()
                backoff = 1.0
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # chain, IPFS, disk: all retried; the journal keeps every record
                recovered = False  # a group left BATCHED (its commit failed, or is still pending) is recovered first
                self.stats.chain_errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("submitter: %s; retrying in %.0f s", self.stats.last_error, backoff)
                delay, backoff = backoff, min(backoff * 2, 60.0)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def step(self) -> None:
        await self.refund_expired()
        while await self._batch_due():
            await self.commit_next()
        await self.finalize_due()

    # -- deadlines -------------------------------------------------------------------------------

    def _commit_by(self, entry: Entry) -> int:
        return entry.usage.request.deadline + self.max_commit_delay

    def _late(self, entry: Entry) -> bool:
        """Whether `entry` must no longer be committed: its commit deadline is within `margin` (a commit
        mined after it is fraud: the batch voided, the node slashed)."""
        return self._commit_by(entry) <= int(self.clock()) + self.margin

    async def refund_expired(self) -> None:
        now = int(self.clock())
        expired = [
            e for e in await self.journal.due(now - self.max_commit_delay + self.margin) if e.state is State.RECORDED
        ]
        await self._refund(expired)

    async def _refund(self, late: list[Entry]) -> None:
        if late:
            await self.journal.transition([e.usage.digest for e in late], State.REFUNDED)
            self.stats.refunded_records += len(late)
            log.warning("submitter: %d records missed their commit deadline and were dropped (not charged)", len(late))

    async def _committable(self, entries: list[Entry]) -> list[Entry]:
        """`entries` less the late ones, which are REFUNDED: checked right before each commit is built, since
        the commit before it may have taken long (fee bumping) and a group may wait BATCHED across a restart."""
        late = [e for e in entries if self._late(e)]
        await self._refund(late)
        return [e for e in entries if e not in late]

    async def _batch_due(self) -> bool:
        waiting = await self.journal.in_state(State.RECORDED, limit=self.max_records)
        if not waiting:
            return False
        now = self.clock()
        if len(waiting) >= self.max_records or now - waiting[0].recorded_at >= self.interval:
            return True
        # Close to a commit deadline: commit now rather than wait for the interval.
        soon = int(now) + int(self.interval) + self.margin - self.max_commit_delay
        return any(e.state is State.RECORDED for e in await self.journal.due(soon, limit=1))

    # -- batches ---------------------------------------------------------------------------------

    def _next_number(self) -> int:
        self._last_number = max(self._last_number + 1, time.time_ns() // 1000)
        return self._last_number

    async def _build(self, entries: list[Entry]) -> Batch:
        leaves = [
            BatchLeaf(e.usage.request, e.usage.request_signature, e.usage.record, e.usage.record_signature)
            for e in entries
        ]
        vouchers: dict[str, Voucher] = {}
        for payer in {leaf.request.payer for leaf in leaves}:
            best = await self.journal.voucher(payer)
            # The payer's own signature never expires; a signer's may have been revoked since, and a voucher
            # the contract refuses would sink the whole commit. Then the batch's own best request serves.
            if best is not None and self._signed_by_payer(best.usage.request, best.usage.request_signature):
                vouchers[payer] = Voucher(best.usage.request, best.usage.request_signature)
        return build_batch(leaves, vouchers)

    def _signed_by_payer(self, request: Any, signature: Any) -> bool:
        try:
            return recover(request.digest(self.domain), signature) == request.payer
        except SignatureError:
            return False

    async def commit_next(self) -> None:
        entries = await self.journal.in_state(State.RECORDED, limit=self.max_records)
        # A record served "after" the chain's clock would read as served after its commit (a node clock
        # running ahead of the block producers'): such records wait for the chain to catch up.
        chain_now = (await self.chain.w3.eth.get_block("pending"))["timestamp"]
        entries = await self._committable([e for e in entries if e.usage.record.served_at <= chain_now])
        if not entries:
            await asyncio.sleep(1.0)
            return
        number = self._next_number()
        await self.journal.transition([e.usage.digest for e in entries], State.BATCHED, batch_id=number)
        await self._commit(number, entries)

    async def _commit(self, number: int, entries: list[Entry]) -> None:
        batch = await self._build(entries)
        settlement = self.contracts.settlement
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        path = self.batch_dir / f"{number}.json"
        path.write_bytes(batch.file_bytes(self.chain.chain_id, settlement.address, self.node))
        cid = await self.publish(path)
        # Mined or cancelled (its nonce spent on an empty transfer) by half the margin before the first commit
        # deadline among its records: a commit mined later is fraud, stuck in a pool however long before.
        within = min(self._commit_by(e) for e in entries) - self.margin / 2 - self.clock()
        if within <= 0:  # publishing took that long: recovery refunds what became late and commits the rest
            raise AttributionError(f"batch {number} reached its commit deadline before it could be sent")
        # And the contract refuses it past the first commit deadline, should it be mined late all the same.
        commit_by = min(self._commit_by(e) for e in entries)

        async def journal_tx(tx_hash: bytes, nonce: int) -> None:  # write-ahead: journaled, then broadcast
            await self.journal.add_commit_tx(number, tx_hash, nonce)

        _, receipt = await settlement.commit_batch(
            self.sender, self.node, batch, cid, within=within, commit_by=commit_by, before_send=journal_tx
        )
        receipt = await self.chain.confirm(receipt, self.confirmations)  # mined again elsewhere: its batch id may change
        batch_id = settlement.events(receipt, "BatchCommitted")[0]["batchId"]
        await self._mark_committed(number, entries)
        self._committed(number, batch_id, batch.payer_tree.root.hash)
        self.stats.committed += 1
        self.stats.last_commit_at = self.clock()
        log.info("submitter: batch %d committed (%d records, %d wei, %s)", batch_id, batch.count, batch.charge, cid)

    async def _mark_committed(self, number: int, entries: list[Entry]) -> None:
        """BATCHED -> COMMITTED, once `on_collected` has heard what the commit took from each payer."""
        if self.on_collected is not None:
            charges: dict[str, int] = {}
            for entry in entries:
                payer = entry.usage.request.payer
                charges[payer] = charges.get(payer, 0) + entry.usage.record.charge
            self.on_collected(charges)
        await self.journal.transition_batch(number, State.COMMITTED)

    def _committed(self, number: int, batch_id: int, root: bytes) -> None:
        self.stats.ids[number] = batch_id
        self._roots[number] = root
        self._open[number] = 0

    async def finalize_due(self) -> None:
        """Finalizes the committed batches whose challenge window has passed. It runs at every step (after
        every record), so it reads the chain only for batches that are due, or whose end is not known yet;
        every `status_interval` seconds it reads all open batches, to learn of a batch voided by a
        challenge."""
        if not self._open:
            return
        now = await self.chain.timestamp()
        read_all = self.clock() - self._statuses_read_at >= self.status_interval
        if read_all:
            self._statuses_read_at = self.clock()
        for number, window_ends in sorted(self._open.items()):
            if not read_all and now < window_ends:  # 0 (not read yet) is never in the future
                continue
            batch_id = self.stats.ids[number]
            header = await self.contracts.settlement.batch_of(batch_id)
            if header.node.lower() != self.node.lower() or header.payer_root != self._roots[number]:
                raise ChainError(f"chain batch {batch_id} no longer holds batch {number} (a reorg?): recovering it")
            if header.status == STATUS_VOIDED:
                await self.journal.transition_batch(number, State.VOIDED)
                self.stats.voided += 1
                log.error("submitter: batch %d was voided on chain", batch_id)
            elif header.status == STATUS_FINALIZED:
                await self.journal.transition_batch(number, State.FINALIZED)
            elif header.committed_at + self.challenge_window <= now:
                batch = await self._build(await self.journal.batch(number))
                await self.contracts.settlement.finalize_batch(self.sender, batch_id, batch.totals())
                await self.journal.transition_batch(number, State.FINALIZED)
                self.stats.finalized += 1
                log.info("submitter: batch %d finalized", batch_id)
            else:
                self._open[number] = header.committed_at + self.challenge_window
                continue
            self._forget(number)  # voided or finalized: settled

    def _forget(self, number: int) -> None:
        self._open.pop(number, None)
        self._roots.pop(number, None)

    # -- restart ---------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Maps journaled BATCHED and COMMITTED groups to the chain's batches (`CommitLocator`), and commits
        again the groups the chain does not hold and never will through a transaction sent before."""
        locator = CommitLocator(self.contracts, self.sender, self.node, self.confirmations)
        batched = await self.journal.in_state(State.BATCHED, limit=1_000_000)
        await locator.wait_for_pending(
            cancel_at=min(self._commit_by(e) for e in batched) - self.margin / 2 if batched else None, clock=self.clock
        )
        groups: dict[int, list[Entry]] = {}
        for state in (State.BATCHED, State.COMMITTED):
            for entry in await self.journal.in_state(state, limit=1_000_000):
                groups.setdefault(entry.batch_id, []).append(entry)
        for number, entries in sorted(groups.items()):
            self._last_number = max(self._last_number, number)
            root = (await self._build(entries)).payer_tree.root.hash
            txs = await self.journal.commit_txs(number)
            batch_id = await locator.locate(number, txs, root, since=max(e.recorded_at for e in entries))
            if batch_id is not None:
                if entries[0].state is State.BATCHED:
                    await self._mark_committed(number, entries)
                elif self.stats.ids.get(number, batch_id) != batch_id:
                    log.warning("submitter: batch %d was mined again as chain batch %d", number, batch_id)
                self._committed(number, batch_id, root)
                continue
            if entries[0].state is State.COMMITTED:
                log.error(
                    "submitter: batch %d (chain batch %s) lost its commit to a reorg deeper than %d confirmations; "
                    "committing its records again", number, self.stats.ids.get(number, "?"), self.confirmations,
                )  # fmt: skip
                await self.journal.transition([e.usage.digest for e in entries], State.BATCHED, batch_id=number)
                self._forget(number)
                self.stats.ids.pop(number, None)
            fresh = await self._committable(entries)
            if len(fresh) == len(entries):
                log.info("submitter: batch %d is not on chain; committing it now", number)
                await self._commit(number, entries)
            elif fresh:  # back in the queue, batched anew (the refunded ones keep this batch number)
                await self.journal.transition([e.usage.digest for e in fresh], State.RECORDED)
