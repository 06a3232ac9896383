"""The submitter's restart safety against a real anvil, a real IPFS node and a real journal: recovery decides
from the receipts of the commit transactions the node journaled before broadcasting them, and from the
contract's state, never from event logs; a commit a reorg took away is made again, once. The node's RPC here
hides every log (`LogDroppingRpc`), and a crash is a SIGKILL of the process that runs the submitter
(`submitter_child`). Threat table: docs/architecture.md, "Submitter restart safety"."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from web3.exceptions import TransactionNotFound

from attribution.aggregation import BatchLeaf, build_batch
from attribution.devchain import Anvil
from attribution.errors import ChainError
from attribution.storage import SqliteJournal, State
from attribution.storage.entries import Usage
from node.adapters.ipfs import LocalIpfsNode
from tests.attribution.helpers import World
from tests.attribution.rpc_proxy import LogDroppingRpc
from tests.attribution.submitting import commit_logs, commits, has_pool_tx, pool_tx, records, until, world_submitter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def rpc(anvil: Anvil) -> AsyncIterator[LogDroppingRpc]:
    """The node's RPC: the session's anvil behind a proxy that answers every eth_getLogs with []."""
    async with LogDroppingRpc(anvil.rpc_url) as proxy:
        yield proxy


def _leaves(usages: list[Usage]) -> list[BatchLeaf]:
    return [BatchLeaf(u.request, u.request_signature, u.record, u.record_signature) for u in usages]


def _root(usages: list[Usage]) -> bytes:
    return build_batch(_leaves(usages)).payer_tree.root.hash


async def _roots(world: World) -> list[bytes]:
    return [bytes(log["args"]["payerRoot"]) for log in await commit_logs(world)]


async def _journal_with_records(world: World, path: Path, n: int = 3, **leaf: object) -> list[Usage]:
    journal = SqliteJournal(path)
    try:
        return await records(world, journal, n, **leaf)
    finally:
        await journal.close()


async def _run_child(world: World, ipfs: LocalIpfsNode, rpc: LogDroppingRpc, tmp: Path, crash: str):
    deployments = tmp / "deployments.json"
    world.deployments.save(deployments)
    config = {
        "rpc_url": rpc.url, "deployments": str(deployments), "key": world.node_signer.key.hex(),
        "node": world.node.address, "ipfs_api_url": ipfs.api_url, "journal": str(tmp / "journal.sqlite"),
        "batch_dir": str(tmp / "batches"), "crash": crash,
    }  # fmt: skip
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.attribution.submitter_child", json.dumps(config), cwd=ROOT
    )


async def _batch_number(journal: SqliteJournal, state: State = State.BATCHED) -> int:
    (number,) = {e.batch_id for e in await journal.in_state(state)}
    return number


async def test_a_commit_mined_after_a_crash_is_found_though_the_rpc_drops_logs(
    world: World, ipfs: LocalIpfsNode, manual_mining, rpc: LogDroppingRpc, tmp_path: Path
) -> None:
    """The node is SIGKILLed with its commit in the pool: sent, COMMITTED never journaled. Then the commit is
    mined. The restarted node's RPC returns no logs, so looking for the batch among this node's BatchCommitted
    events finds nothing; committing the records again would be a provable duplicate (the node slashed).
    Recovery reads the receipt of the transaction it journaled before sending it, and commits nothing."""
    await _journal_with_records(world, tmp_path / "journal.sqlite")
    child = await _run_child(world, ipfs, rpc, tmp_path, crash="after-send")
    try:
        await until(lambda: has_pool_tx(world), timeout=60)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    sent = await pool_tx(world)
    await manual_mining()
    await world.chain.rpc("evm_setAutomine", [True])  # from here on, whatever is sent is mined
    assert await commits(world) == 1  # on chain; the crashed node never learnt it
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, restarted = await world_submitter(world, ipfs.api_url, journal, tmp_path, rpc_url=rpc.url)
    try:
        number = await _batch_number(journal)
        assert [tx.tx_hash for tx in await journal.commit_txs(number)] == [sent["hash"]]  # journaled before sent
        assert await commit_logs(world, chain) == []  # what this RPC shows of the commit
        await restarted.recover()
        assert await commits(world) == 1  # a second commit here is a duplicate: provable fraud
        assert (await journal.depth())[State.COMMITTED] == 3
        (log,) = await commit_logs(world)
        assert restarted.stats.ids == {number: log["args"]["batchId"]}
        await restarted.recover()  # and again, as after every failed pass: still nothing sent
        assert await commits(world) == 1
    finally:
        await journal.close()
        await chain.close()


async def test_a_crash_between_journaling_and_broadcasting_a_commit_commits_once(
    world: World, ipfs: LocalIpfsNode, rpc: LogDroppingRpc, tmp_path: Path
) -> None:
    """The node dies right after journaling its commit's hash, before broadcasting it. That transaction is
    nowhere the node can see, but cannot be proven never to come: recovery retires its nonce (an empty
    transfer mined in its place), then commits the batch once with the next nonce."""
    usages = await _journal_with_records(world, tmp_path / "journal.sqlite")
    eth = world.chain.w3.eth
    me = world.node_signer.address
    nonce = await eth.get_transaction_count(me)
    child = await _run_child(world, ipfs, rpc, tmp_path, crash="before-broadcast")
    assert await asyncio.wait_for(child.wait(), 60) == -signal.SIGKILL
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, restarted = await world_submitter(world, ipfs.api_url, journal, tmp_path, rpc_url=rpc.url)
    try:
        number = await _batch_number(journal)
        (unsent,) = await journal.commit_txs(number)
        assert unsent.nonce == nonce and await eth.get_transaction_count(me, "pending") == nonce
        with pytest.raises(TransactionNotFound):
            await eth.get_transaction(unsent.tx_hash)
        await restarted.recover()
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await _roots(world) == [_root(usages)]
        first, second = await journal.commit_txs(number)
        assert first == unsent and second.nonce == nonce + 1
        assert (await eth.get_transaction_receipt(second.tx_hash))["status"] == 1
        block = await eth.get_block((await eth.get_transaction_receipt(second.tx_hash))["blockNumber"] - 1, True)
        (retired,) = [tx for tx in block["transactions"] if tx["from"] == me]
        assert (retired["nonce"], retired["to"], retired["input"]) == (nonce, me, b"")  # the empty transfer
    finally:
        await journal.close()
        await chain.close()


async def test_a_reorg_deeper_than_confirmations_gets_the_batch_committed_again_once(
    world: World, ipfs: LocalIpfsNode, rpc: LogDroppingRpc, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A COMMITTED batch whose commit the chain no longer holds (a reorg deeper than `confirmations`) used to
    stall recovery for good. The restarted node puts it back to BATCHED, says so loudly, and commits it once."""
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    usages = await records(world, journal)
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path, rpc_url=rpc.url)
    restarted_chain = None
    try:
        before = await world.chain.snapshot()
        await submitter.commit_next()
        number = await _batch_number(journal, State.COMMITTED)
        (lost,) = await journal.commit_txs(number)
        for _ in range(3):
            await world.chain.rpc("evm_mine")  # buried under 3 more blocks: past `confirmations` (1)
        await world.chain.revert(before)  # the reorg: the commit is gone
        assert await commits(world) == 0
        restarted_chain, restarted = await world_submitter(world, ipfs.api_url, journal, tmp_path, rpc_url=rpc.url)
        with caplog.at_level(logging.ERROR, logger="attribution.submitter"):
            await restarted.recover()
        assert any("lost its commit to a reorg" in r.message for r in caplog.records)
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await _roots(world) == [_root(usages)]
        first, second = await journal.commit_txs(number)
        assert first == lost and second.nonce == lost.nonce + 1  # the lost transaction's nonce was retired
        await restarted.recover()
        assert await commits(world) == 1
    finally:
        await journal.close()
        await chain.close()
        if restarted_chain is not None:
            await restarted_chain.close()


async def test_a_reorg_seen_while_running_is_recovered_by_the_loop(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    """No restart: the running submitter's periodic read of its open batches finds its chain batch id empty
    after the reorg, recovers, and commits the batch again once."""
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    usages = await records(world, journal)
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path)
    submitter.status_interval = 0  # read every open batch at every pass
    before = await world.chain.snapshot()
    running = asyncio.create_task(submitter.run())
    try:

        async def committed_on_chain() -> bool:
            return (await journal.depth())[State.COMMITTED] == 3 and await commits(world) == 1

        await until(committed_on_chain)
        await world.chain.revert(before)

        async def committed_again() -> bool:
            return submitter.stats.committed == 2 and await committed_on_chain()

        await until(committed_again)
        assert await _roots(world) == [_root(usages)]
        assert "no longer holds batch" in submitter.stats.last_error
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await journal.close()
        await chain.close()


async def test_a_record_made_late_by_a_reorg_is_refunded_and_the_rest_committed_once(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    """The reorg comes when one record's commit deadline is within the margin: committing it again would be
    fraud (too late). It is refunded; the others go back in the queue and the next batch commits them once."""
    now = await world.chain.timestamp()
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    (soon,) = await records(world, journal, 1, served_at=now - 500)  # commit deadline: now + 100
    fresh = await records(world, journal, 2)
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path)
    clock = [float(now)]
    submitter.clock = lambda: clock[0]
    try:
        before = await world.chain.snapshot()
        await submitter.commit_next()
        assert (await journal.depth())[State.COMMITTED] == 3
        await world.chain.revert(before)
        clock[0] = now + 50  # within the 60 s margin of `soon`'s commit deadline
        await submitter.recover()
        assert (await journal.get(soon.digest)).state is State.REFUNDED
        assert {e.usage.digest for e in await journal.in_state(State.RECORDED)} == {u.digest for u in fresh}
        assert await commits(world) == 0
        await submitter.commit_next()
        assert await _roots(world) == [_root(fresh)]
    finally:
        await journal.close()
        await chain.close()


async def test_a_commit_mined_again_under_another_batch_id_is_followed_not_repeated(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    """A reorg re-mines the node's commit after another commit took its batch id: the open batch's id now
    holds someone else's root. The submitter notices, and recovery takes the new id from the receipt of its
    own transaction; nothing is sent again."""
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    usages = await records(world, journal)
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path)
    try:
        before = await world.chain.snapshot()
        await submitter.commit_next()
        ((number, old_id),) = submitter.stats.ids.items()
        (commit,) = await journal.commit_txs(number)
        raw = await world.chain.rpc("eth_getRawTransactionByHash", ["0x" + commit.tx_hash.hex()])
        await world.chain.revert(before)
        other = build_batch([await world.leaf(world.payer_b)])
        assert await world.commit(other, sender=world.node) == old_id  # the node's own key: another sender
        await world.chain.w3.eth.send_raw_transaction(raw)  # our commit, mined again after it
        submitter.status_interval = 0
        with pytest.raises(ChainError, match=f"chain batch {old_id} no longer holds batch {number}"):
            await submitter.finalize_due()
        await submitter.recover()
        assert submitter.stats.ids == {number: old_id + 1}
        assert await journal.commit_txs(number) == [commit]
        assert await _roots(world) == [other.payer_tree.root.hash, _root(usages)]
        assert (await world.c.settlement.batch_of(old_id + 1)).payer_root == _root(usages)
    finally:
        await journal.close()
        await chain.close()


@pytest.mark.parametrize("one_block", [False, True], ids=["mined-as-sent", "retirements-in-one-block"])
async def test_a_journaled_commit_behind_a_nonce_gap_is_never_doubled(
    world: World, ipfs: LocalIpfsNode, rpc: LogDroppingRpc, tmp_path: Path, one_block: bool
) -> None:
    """A journaled commit whose nonce is above the next free one (the transactions before it lost, e.g. to a
    reorg) waits in the pool until the gap is filled. Committing again with the free nonce would fill the gap
    and let it be mined too: a duplicate. Recovery retires every nonce up to it. Mined one by one (automine),
    filling the gap lets the waiting commit in first, and recovery takes it as the batch's commit; with both
    retirements in one block, the commit is replaced, and recovery commits once with the next nonce."""
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    usages = await records(world, journal)
    await journal.transition([u.digest for u in usages], State.BATCHED, batch_id=1)
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path, rpc_url=rpc.url)
    eth = world.chain.w3.eth
    me = world.node_signer.address
    mining = None
    try:
        free = await eth.get_transaction_count(me)
        batch = build_batch(_leaves(usages))
        fees = await world.chain.market_fees()
        commit = await world.c.settlement.contract.functions.commitBatch(
            world.node.address, batch.commitment("bafkreitest"), batch.totals(), batch.vouchers_abi()
        ).build_transaction({"from": me, "nonce": free + 1, "gas": 2_000_000, "chainId": world.chain.chain_id,
                             "maxFeePerGas": fees[0], "maxPriorityFeePerGas": fees[1]})  # fmt: skip
        signed = world.node_signer.sign_transaction(commit)
        await journal.add_commit_tx(1, bytes(signed.hash), free + 1)
        await eth.send_raw_transaction(signed.raw_transaction)  # queued behind the free nonce
        if one_block:
            await world.chain.rpc("evm_setAutomine", [False])
            mining = asyncio.create_task(_mine_every(world, 0.3))
        await submitter.recover()
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await _roots(world) == [_root(usages)]
        journaled = await journal.commit_txs(1)
        if one_block:
            with pytest.raises(TransactionNotFound):
                await eth.get_transaction_receipt(signed.hash)  # replaced by the retirement of its nonce
            assert journaled[-1].nonce == free + 2
        else:
            assert (await eth.get_transaction_receipt(signed.hash))["status"] == 1
            assert [tx.tx_hash for tx in journaled] == [signed.hash]  # nothing sent again
    finally:
        if mining is not None:
            mining.cancel()
            await asyncio.gather(mining, return_exceptions=True)
            await world.chain.rpc("evm_setAutomine", [True])
        await journal.close()
        await chain.close()


async def _mine_every(world: World, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await world.chain.rpc("evm_mine")


async def test_a_commit_the_journal_has_no_transaction_for_is_found_in_contract_state(
    world: World, ipfs: LocalIpfsNode, rpc: LogDroppingRpc, tmp_path: Path
) -> None:
    """A BATCHED group with no journaled transaction (a journal from before version 2, migrated) whose batch is
    on chain: no receipt to read and no logs from this RPC, but the contract's batches hold this node's root."""
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    usages = await records(world, journal)
    await journal.transition([u.digest for u in usages], State.BATCHED, batch_id=9)
    batch_id = await world.commit(build_batch(_leaves(usages)))  # what the node sent before its upgrade
    chain, submitter = await world_submitter(world, ipfs.api_url, journal, tmp_path, rpc_url=rpc.url)
    try:
        await submitter.recover()
        assert (await journal.depth())[State.COMMITTED] == 3
        assert submitter.stats.ids == {9: batch_id}
        assert await commits(world) == 1
    finally:
        await journal.close()
        await chain.close()
