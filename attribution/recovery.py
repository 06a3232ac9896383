"""Where a journaled batch stands on chain, asked of the chain's state and of the receipts of the node's own
commit transactions (each journaled before it was broadcast), never of event logs: a provider may cap, drop or
lag logs, and a batch committed twice is a provable fraud that slashes the node. The threats and defences are
tabled in docs/architecture.md ("Submitter restart safety"); `Submitter.recover` acts on the answers.

`CommitLocator.locate` answers one of two things for a batch:
* **committed**, with its chain batch id: a receipt of one of its transactions, successful and confirmed,
  carries the `BatchCommitted` event, and the contract's `batchOf(id)` holds this node and this payer root;
  or, when none of them was mined, the contract holds a batch of this node with this payer root committed
  after the batch's last record (a commit the journal does not know of: a journal from before version 2);
* **not committed, and never will be through any transaction sent so far**: each journaled transaction's
  nonce is taken by another transaction (a cancellation, a later commit). A nonce not taken yet (a crash
  before the broadcast, a transaction dropped from the pool or taken away by a reorg) could still be mined
  from some pool this RPC does not show, so it is first *retired*: an empty transfer to the sender with
  that nonce, priced above anything the node signs, is mined in its place.
Only then may the caller commit the records again, refund them, or put them back in the queue.

What stays trusted: the RPC's receipts, nonces and contract state (one lying about all three at once can
make any node misbehave; run your own, or one you trust, for the submitter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from web3.exceptions import TransactionNotFound
from web3.types import TxReceipt

from attribution.chain import BatchHeader
from attribution.errors import AttributionError, ChainError
from attribution.storage import CommitTx

log = logging.getLogger(__name__)

# How far before a batch's last record the contract's batches are searched for its root: the node's clock
# and the chain's block times differ by seconds, and a batch is formed after its records, committed after that.
STATE_SEARCH_SLACK_S = 600.0


class CommitLocator:
    """One recovery pass's view of the chain (contract headers read once per pass: a reorg may change them)."""

    def __init__(self, contracts: Any, sender: LocalAccount, node: str, confirmations: int) -> None:
        self.settlement = contracts.settlement
        self.chain = contracts.settlement.chain
        self.sender = sender
        self.node = node.lower()
        self.confirmations = confirmations
        self._headers: dict[int, BatchHeader] = {}
        self._batch_count: int | None = None

    async def wait_for_pending(
        self, cancel_at: float | None = None, clock: Callable[[], float] = time.time, timeout: float = 300.0
    ) -> None:
        """Waits until no transaction of the sender is pending: a commit sent before a crash may still be in the
        pool and be mined. From `cancel_at` (on `clock`: half the margin before the first commit deadline of a
        BATCHED group) on, a pending nonce is cancelled (`Chain.cancel`): left there, a commit could be mined late."""
        eth = self.chain.w3.eth
        address = self.sender.address
        deadline = time.monotonic() + timeout
        cancelled: set[int] = set()
        while (nonce := await eth.get_transaction_count(address, "latest")) < await eth.get_transaction_count(
            address, "pending"
        ):
            if cancel_at is not None and clock() >= cancel_at and nonce not in cancelled:
                cancelled.add(nonce)
                try:
                    await self.chain.cancel(self.sender, nonce)
                except ChainError as exc:  # mined meanwhile, or priced under its pending version: wait on
                    log.warning("recovery: %s", exc)
            if time.monotonic() > deadline:
                raise AttributionError("transactions of the node's sender stay pending; not committing blind")
            await asyncio.sleep(1.0)

    async def locate(self, number: int, txs: Sequence[CommitTx], root: bytes, since: float) -> int | None:
        """The chain batch id of local batch `number` (payer root `root`, last record at `since` on the node's
        clock, commit transactions `txs`), or None: not on chain, and none of `txs` can be mined any more.
        Call after `wait_for_pending`. Raises `AttributionError` while the chain's answers disagree."""
        for retired in (False, True):
            for tx in reversed(txs):  # the newest version first: the likeliest to be the one mined
                batch_id = await self._mined_commit(tx, root)
                if batch_id is not None:
                    return batch_id
            latest = await self.chain.w3.eth.get_transaction_count(self.sender.address, "latest")
            live = [tx.nonce for tx in txs if tx.nonce >= latest]
            if not live:
                break
            if retired:
                raise AttributionError(f"nonces {latest}..{max(live)} of batch {number}'s commits are still free")
            await self._retire(number, latest, max(live))
        batch_id = await self._committed_in_state(root, since)
        if batch_id is not None:
            log.error(
                "recovery: batch %d is committed on chain as batch %d by a transaction the journal does not hold",
                number, batch_id,
            )  # fmt: skip
        return batch_id

    async def _mined_commit(self, tx: CommitTx, root: bytes) -> int | None:
        """The batch id `tx` committed, if it is mined, succeeded and is confirmed; the contract must agree."""
        try:
            receipt: TxReceipt = await self.chain.w3.eth.get_transaction_receipt(tx.tx_hash)
        except TransactionNotFound:
            return None
        if receipt["status"] != 1:
            return None
        receipt = await self.chain.confirm(receipt, self.confirmations)
        events = self.settlement.events(receipt, "BatchCommitted")
        if not events:
            raise AttributionError(f"commit transaction 0x{tx.tx_hash.hex()} succeeded without a BatchCommitted event")
        batch_id = events[0]["batchId"]
        header = await self.settlement.batch_of(batch_id)
        if header.node.lower() != self.node or header.payer_root != root:
            raise AttributionError(
                f"the receipt of 0x{tx.tx_hash.hex()} says batch {batch_id}, which the contract holds for another "
                "node or root: the RPC's answers disagree (a reorg under way?); deciding later"
            )
        return batch_id

    async def _retire(self, number: int, low: int, high: int) -> None:
        """Takes nonces `low`..`high` with empty transfers (mined in place of any journaled transaction there)."""
        log.warning(
            "recovery: commit transactions of batch %d at nonces up to %d are not mined; retiring nonces %d..%d "
            "so that none of them ever can be", number, high, low, high,
        )  # fmt: skip
        for nonce in range(low, high + 1):
            try:
                await self.chain.cancel(self.sender, nonce)
            except ChainError as exc:  # "nonce too low": taken meanwhile, which is all this wants
                log.warning("recovery: %s", exc)
        await self.wait_for_pending()

    async def _committed_in_state(self, root: bytes, since: float) -> int | None:
        """This node's batch with payer root `root` among the contract's batches committed from `since` (less the
        slack) on, newest first."""
        if self._batch_count is None:
            self._batch_count = await self.settlement.batch_count()
        for batch_id in range(self._batch_count, 0, -1):
            header = self._headers.get(batch_id)
            if header is None:
                header = self._headers[batch_id] = await self.settlement.batch_of(batch_id)
            if header.committed_at < since - STATE_SEARCH_SLACK_S:
                return None
            if header.node.lower() == self.node and header.payer_root == root:
                return batch_id
        return None
