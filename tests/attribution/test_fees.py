"""Stuck transactions: a commit not mined within `replace_after` is sent again with the same nonce and higher
EIP-1559 fees, up to the cap, and the batch is committed exactly once, also across a restart. Real anvil with
automatic mining off (blocks only when the test mines one), the real submitter, journal and IPFS node."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from web3.exceptions import TransactionNotFound

from attribution.aggregation import BatchLeaf, build_batch
from attribution.chain import Chain
from attribution.errors import AttributionError, ChainError
from attribution.fees import FeePolicy
from attribution.storage import SqliteJournal, State
from attribution.storage.entries import Usage
from node.adapters.ipfs import LocalIpfsNode
from tests.attribution.helpers import CONFIG, World
from tests.attribution.submitting import commit_logs, commits, has_pool_tx, pool_tx, records, until, world_submitter


async def _submitter(world: World, ipfs: LocalIpfsNode, journal: SqliteJournal, tmp: Path, fees: FeePolicy):
    return await world_submitter(world, ipfs.api_url, journal, tmp, fees)


async def _journal(world: World, path: Path, n: int = 3) -> SqliteJournal:
    journal = SqliteJournal(path)
    await records(world, journal, n)
    return journal



def test_fee_policy_bounds() -> None:
    with pytest.raises(ValueError, match="below"):
        FeePolicy(bump=0.0999)
    policy = FeePolicy(bump=0.10, max_fee_per_gas=1_100)
    assert policy.initial(400, 100) == (900, 100)  # room for the base fee to double
    assert policy.initial(10_000, 100) == (1_100, 100)  # never above the cap
    assert policy.bumped((1_000, 100), (0, 0)) == (1_100, 110)  # +10% each: the cap itself is allowed
    assert policy.bumped((1_001, 100), (0, 0)) is None  # would pass the cap
    assert policy.bumped((900, 0), (0, 0)) == (990, 1)  # a zero tip still rises
    assert policy.bumped((900, 100), (1_050, 300)) == (1_050, 300)  # the market rose more: follow it
    assert policy.cancellation((1_100, 100)) == (1_210, 110)  # one bump, past the cap: it must replace the last
    assert policy.cancellation((0, 0)) == (1, 1)


async def test_stuck_commit_is_replaced_with_higher_fees_and_committed_once(
    world: World, ipfs: LocalIpfsNode, manual_mining, tmp_path: Path
) -> None:
    journal = await _journal(world, tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy(replace_after=0.5, bump=0.2))
    eth = world.chain.w3.eth
    try:
        committing = asyncio.create_task(submitter.commit_next())

        async def sent() -> bool:
            return await eth.get_transaction_count(
                world.node_signer.address, "pending"
            ) > await eth.get_transaction_count(world.node_signer.address, "latest")

        await until(sent)
        first = await pool_tx(world)

        async def replaced_twice() -> bool:  # read in the pool: the counter rises before a replacement is sent
            return (await pool_tx(world))["maxFeePerGas"] >= first["maxFeePerGas"] * 1.2**2

        await until(replaced_twice)
        await manual_mining()
        await asyncio.wait_for(committing, 30)
        (commit,) = await commit_logs(world)
        mined = await eth.get_transaction(commit["transactionHash"])
        assert mined["nonce"] == first["nonce"] and mined["hash"] != first["hash"] and chain.replacements >= 2
        assert mined["maxFeePerGas"] >= first["maxFeePerGas"] * 1.2**2  # bumped twice by 20%
        assert mined["maxPriorityFeePerGas"] > first["maxPriorityFeePerGas"]
        with pytest.raises(TransactionNotFound):
            await eth.get_transaction_receipt(first["hash"])  # the stuck version was replaced, never mined
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await commits(world) == 1
        # every version was journaled before it was sent (the first one first), the mined one among them
        (number,) = submitter.stats.ids
        journaled = await journal.commit_txs(number)
        assert len(journaled) == chain.replacements + 1 >= 3 and {tx.nonce for tx in journaled} == {first["nonce"]}
        assert journaled[0].tx_hash == first["hash"] and mined["hash"] in {tx.tx_hash for tx in journaled}
    finally:
        await journal.close()
        await chain.close()


async def test_at_the_fee_cap_a_commit_is_cancelled_not_left_in_the_pool(
    world: World, ipfs: LocalIpfsNode, manual_mining, tmp_path: Path
) -> None:
    """A commit stuck at the fee cap is not left in the pool, where it could be mined at any time (after its
    deadline too: fraud): its nonce goes to an empty transfer one bump past the cap; recovery commits it once."""
    journal = await _journal(world, tmp_path / "journal.sqlite")
    market, _ = await world.chain.market_fees()
    capped = FeePolicy(replace_after=0.3, max_fee_per_gas=market)  # no room for a replacement
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, capped)
    try:
        with pytest.raises(ChainError, match="still unmined at the fee cap"):
            await submitter.commit_next()
        pooled = await pool_tx(world)
        assert chain.replacements == 0 and pooled["to"] == world.node_signer.address and pooled["input"] == b""
        assert market < pooled["maxFeePerGas"] <= market * 1.125 + 1  # one bump past the cap
        assert (await journal.depth())[State.BATCHED] == 3  # sent, fate unknown: the journal says so
        recovering = asyncio.create_task(submitter.recover())
        await asyncio.sleep(0.5)
        assert not recovering.done()  # not committing blind while the nonce is pending
        await manual_mining()
        await world.chain.rpc("evm_setAutomine", [True])
        await asyncio.wait_for(recovering, 30)
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await commits(world) == 1
    finally:
        await journal.close()
        await chain.close()


async def test_a_restart_maps_the_commit_pending_at_the_crash_and_commits_nothing_twice(
    world: World, ipfs: LocalIpfsNode, manual_mining, tmp_path: Path
) -> None:
    journal = await _journal(world, tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    try:
        committing = asyncio.create_task(submitter.commit_next())
        await until(lambda: has_pool_tx(world))
        committing.cancel()  # the node dies with its commit in the pool
        with contextlib.suppress(asyncio.CancelledError):
            await committing
        await chain.close()
        # A restart: the new submitter's recovery waits for the pending commit, then finds it on chain.
        chain, restarted = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
        recovering = asyncio.create_task(restarted.recover())
        await asyncio.sleep(0.5)
        assert not recovering.done()  # not committing blind while a commit is pending
        await manual_mining()
        await asyncio.wait_for(recovering, 30)
        assert (await journal.depth())[State.COMMITTED] == 3
        assert await commits(world) == 1
    finally:
        await journal.close()
        await chain.close()


async def test_a_nonce_taken_by_another_sender_with_the_key_is_an_error(world: World, manual_mining) -> None:
    """Another process with the node's key replaces our pending transaction (same nonce, higher fees):
    once that one is mined, ours never will be, and `transact` says so instead of waiting for it."""
    url = world.chain.w3.provider.endpoint_uri
    chain = await Chain.connect(url, fees=FeePolicy(replace_after=60))
    eth = world.chain.w3.eth
    me = world.node_signer.address
    try:
        ours = asyncio.create_task(chain.transact(world.node_signer, to=world.payer_a.address, data="0x"))

        async def sent() -> bool:
            return await eth.get_transaction_count(me, "pending") > await eth.get_transaction_count(me, "latest")

        await until(sent)
        tx = await pool_tx(world)
        foreign = {
            "from": me, "to": world.payer_b.address, "value": 1, "gas": 21_000, "nonce": tx["nonce"],
            "chainId": chain.chain_id, "maxFeePerGas": tx["maxFeePerGas"] * 2,
            "maxPriorityFeePerGas": tx["maxPriorityFeePerGas"] * 2 + 1,
        }  # fmt: skip
        await eth.send_raw_transaction(world.node_signer.sign_transaction(foreign).raw_transaction)
        await manual_mining()
        with pytest.raises(ChainError, match="did not send"):
            await asyncio.wait_for(ours, 30)
        with pytest.raises(TransactionNotFound):
            await eth.get_transaction_receipt(tx["hash"])
    finally:
        await chain.close()


async def _late_and_fresh(world: World, path: Path) -> tuple[SqliteJournal, list[Usage], list[Usage], int]:
    """A journal holding one record already past its commit deadline (`deadline + maxCommitDelay`: the node was
    down, or its commit stuck, for longer than that) and two fresh ones; and the chain's time now. A commit of
    the late one now is fraud (OutsideDeadline: the batch is voided, the node slashed)."""
    await world.chain.increase_time(1_000)
    now = await world.chain.timestamp()
    journal = SqliteJournal(path)
    late, fresh = [], []
    for served_at, into in ((now - 650, late), (now - 1, fresh), (now - 1, fresh)):  # deadline = served_at + 300
        leaf = await world.leaf(world.payer_a, served_at=served_at)
        usage = Usage(leaf.request, leaf.signature, leaf.record, leaf.record_signature, "bafy-adapter-one")
        await journal.append(usage)
        into.append(usage)
    return journal, late, fresh, now


def _root(usages: list[Usage]) -> bytes:
    leaves = [BatchLeaf(u.request, u.request_signature, u.record, u.record_signature) for u in usages]
    return build_batch(leaves).payer_tree.root.hash


async def _committed_roots(world: World) -> list[bytes]:
    return [bytes(log["args"]["payerRoot"]) for log in await commit_logs(world)]


async def test_recovery_never_commits_a_record_past_its_commit_deadline(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    """A group left BATCHED (a commit that failed, was given up at the fee cap and dropped, or a crash) is
    committed again by `recover`: without the records whose commit deadline has passed (or is within the
    margin), which are REFUNDED; the others go back to RECORDED and the next batch commits them once."""
    journal, late, fresh, now = await _late_and_fresh(world, tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    submitter.clock = lambda: now
    try:
        await journal.transition([u.digest for u in late + fresh], State.BATCHED, batch_id=7)
        await submitter.recover()
        assert (await journal.get(late[0].digest)).state is State.REFUNDED
        assert {e.usage.digest for e in await journal.in_state(State.RECORDED)} == {u.digest for u in fresh}
        assert await commits(world) == 0
        await submitter.commit_next()
        assert {e.usage.digest for e in await journal.in_state(State.COMMITTED)} == {u.digest for u in fresh}
        assert await _committed_roots(world) == [_root(fresh)]  # the chain got the fresh records alone
    finally:
        await journal.close()
        await chain.close()


async def test_a_batch_built_after_a_long_commit_leaves_out_late_records(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    """`step` refunds late records, then commits batch after batch; one commit may take long (fee bumping), so
    each batch drops what became late meanwhile, not only the first."""
    journal, late, fresh, now = await _late_and_fresh(world, tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    submitter.clock = lambda: now
    try:
        await submitter.commit_next()
        assert (await journal.get(late[0].digest)).state is State.REFUNDED
        assert {e.usage.digest for e in await journal.in_state(State.COMMITTED)} == {u.digest for u in fresh}
        assert await _committed_roots(world) == [_root(fresh)]
    finally:
        await journal.close()
        await chain.close()


async def test_commit_deadline_margin_at_its_bound(world: World, ipfs: LocalIpfsNode, tmp_path: Path) -> None:
    """A record is left out of a batch from `margin` seconds before its commit deadline on: one second
    more is committed, the bound itself and one second less are refunded."""
    now = await world.chain.timestamp()
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    try:
        usages = {}
        for offset in (-1, 0, 1):
            leaf = await world.leaf(world.payer_a, served_at=now - 10 + offset)
            usages[offset] = Usage(leaf.request, leaf.signature, leaf.record, leaf.record_signature, "bafy-adapter-one")
            await journal.append(usages[offset])
        bound = usages[0].request.deadline + submitter.max_commit_delay - submitter.margin
        submitter.clock = lambda: bound
        await submitter.commit_next()
        states = {offset: (await journal.get(u.digest)).state for offset, u in usages.items()}
        assert states == {-1: State.REFUNDED, 0: State.REFUNDED, 1: State.COMMITTED}
        assert await _committed_roots(world) == [_root([usages[1]])]
    finally:
        await journal.close()
        await chain.close()


async def test_a_commit_unmined_at_its_deadline_is_cancelled_never_mined_late(
    world: World, ipfs: LocalIpfsNode, manual_mining, tmp_path: Path
) -> None:
    """A commit stuck in the pool (here: nothing is mined) would be fraud if mined after the first commit
    deadline of its records. Before that (half the margin before), its nonce goes to an empty transfer to the
    sender priced one bump higher, which is what gets mined; the group stays BATCHED and recovery refunds it."""
    start, t0 = await world.chain.timestamp(), time.monotonic()
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy(replace_after=1.0))
    submitter.clock = lambda: start + (time.monotonic() - t0)
    # Cancelled at commit_by - 2, checked against commit_by after the test saw it in the pool: 2 s for that
    # on a loaded machine; 4 s (commit_by - margin) to build and send the commit.
    submitter.margin = 4
    try:
        commit_by = start + 8  # the record's request deadline + maxCommitDelay (300 + 300)
        leaf = await world.leaf(world.payer_a, served_at=commit_by - 600)
        usage = Usage(leaf.request, leaf.signature, leaf.record, leaf.record_signature, "bafy-adapter-one")
        await journal.append(usage)
        committing = asyncio.create_task(submitter.commit_next())
        node = world.node_signer.address

        async def cancelled_in_pool() -> bool:
            pending = await world.chain.w3.eth.get_block("pending", full_transactions=True)
            return any(tx["from"] == node and tx["to"] == node for tx in pending["transactions"])

        await until(cancelled_in_pool, timeout=30)
        assert submitter.clock() < commit_by
        await world.chain.rpc("evm_setNextBlockTimestamp", [commit_by + 1])  # the block comes late
        await manual_mining()
        with pytest.raises(ChainError, match="not mined by its deadline"):
            await asyncio.wait_for(committing, 30)
        block = await world.chain.w3.eth.get_block("latest", full_transactions=True)
        (mined,) = [tx for tx in block["transactions"] if tx["from"] == node]
        assert (mined["to"], mined["input"], mined["gas"]) == (node, b"", 21_000)
        assert await commits(world) == 0  # the late commit never reached the chain
        assert (await journal.get(usage.digest)).state is State.BATCHED
        await submitter.recover()
        assert (await journal.get(usage.digest)).state is State.REFUNDED and await commits(world) == 0
    finally:
        await journal.close()
        await chain.close()


async def test_a_batch_whose_deadline_passes_while_publishing_is_not_sent(
    world: World, ipfs: LocalIpfsNode, tmp_path: Path
) -> None:
    """Publishing the batch file took so long that the commit could no longer be mined in time: nothing is
    sent, and recovery refunds the record."""
    start = await world.chain.timestamp()
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    # The node's clock stands still but for publishing (on the wall clock, a slow machine could take the
    # 2 s before the batch is built, and the record would be refunded before it: nothing to test).
    now = [start]
    submitter.clock = lambda: now[0]
    submitter.margin = 2
    publish = submitter.publish

    async def slow_publish(path: Path) -> str:
        cid = await publish(path)
        now[0] = start + 3  # it took 3 s: the commit has 0 s left before `deadline - margin / 2`
        return cid

    submitter.publish = slow_publish
    try:
        leaf = await world.leaf(world.payer_a, served_at=start + 4 - 600)  # commit deadline: start + 4
        usage = Usage(leaf.request, leaf.signature, leaf.record, leaf.record_signature, "bafy-adapter-one")
        await journal.append(usage)
        nonce = await world.chain.w3.eth.get_transaction_count(world.node_signer.address, "pending")
        with pytest.raises(AttributionError, match="reached its commit deadline before it could be sent"):
            await submitter.commit_next()
        assert await world.chain.w3.eth.get_transaction_count(world.node_signer.address, "pending") == nonce
        await submitter.recover()
        assert (await journal.get(usage.digest)).state is State.REFUNDED and await commits(world) == 0
    finally:
        await journal.close()
        await chain.close()


async def test_a_commit_pending_across_a_restart_is_cancelled_before_its_deadline(
    world: World, ipfs: LocalIpfsNode, manual_mining, tmp_path: Path
) -> None:
    """The node dies with its commit in the pool; the restarted node does not know that transaction's fees.
    Its recovery waits for it, and half the margin before the first commit deadline of the BATCHED group it
    cancels the nonce at a price above any version the node signs; the late block carries the cancellation,
    and the record is refunded."""
    start, t0 = await world.chain.timestamp(), time.monotonic()
    journal = SqliteJournal(tmp_path / "journal.sqlite")
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    # Recovery looks at the pending nonce once a second: from commit_by - margin / 2 it cancels at its next
    # look, and the test checks that against commit_by once it sees the cancellation, so margin / 2 (3 s) is
    # a second of polling and 2 s for the rest on a loaded machine; 5 s (commit_by - margin) to send the commit.
    margin = 6
    try:
        commit_by = start + 11
        leaf = await world.leaf(world.payer_a, served_at=commit_by - 600)
        usage = Usage(leaf.request, leaf.signature, leaf.record, leaf.record_signature, "bafy-adapter-one")
        await journal.append(usage)
        submitter.clock = lambda: start + (time.monotonic() - t0)
        submitter.margin = margin
        committing = asyncio.create_task(submitter.commit_next())
        await until(lambda: has_pool_tx(world))
        committing.cancel()  # the node dies with its commit in the pool
        with contextlib.suppress(asyncio.CancelledError):
            await committing
        commit = await pool_tx(world)
        await chain.close()
        chain, restarted = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
        restarted.clock = lambda: start + (time.monotonic() - t0)
        restarted.margin = margin
        recovering = asyncio.create_task(restarted.recover())
        node = world.node_signer.address

        async def cancelled_in_pool() -> bool:
            return (await pool_tx(world))["to"] == node

        await until(cancelled_in_pool, timeout=30)
        assert restarted.clock() < commit_by and not recovering.done()
        cancel = await pool_tx(world)
        assert cancel["nonce"] == commit["nonce"] and cancel["maxFeePerGas"] > FeePolicy().max_fee_per_gas
        await world.chain.rpc("evm_setNextBlockTimestamp", [commit_by + 1])  # the block comes late
        await manual_mining()
        await asyncio.wait_for(recovering, 30)
        assert await commits(world) == 0  # the late commit never reached the chain
        assert (await journal.get(usage.digest)).state is State.REFUNDED
    finally:
        await journal.close()
        await chain.close()


async def test_finalize_reads_the_chain_only_for_batches_due(world: World, ipfs: LocalIpfsNode, tmp_path: Path) -> None:
    """`finalize_due` runs after every record: it asks the chain about a committed batch once to learn when its
    challenge window ends, then not again until then (or the periodic status read that notices a void), and
    finalizes it once the window has passed. It used to read every open batch at every record."""
    journal = await _journal(world, tmp_path / "journal.sqlite", n=2)
    chain, submitter = await _submitter(world, ipfs, journal, tmp_path, FeePolicy())
    submitter.challenge_window = CONFIG.challenge_window  # the deployment's
    settlement = submitter.contracts.settlement
    reads: list[int] = []
    batch_of = settlement.batch_of

    async def counted(batch_id: int):
        reads.append(batch_id)
        return await batch_of(batch_id)

    settlement.batch_of = counted
    try:
        await submitter.commit_next()
        await submitter.finalize_due()  # learns when the window ends
        for _ in range(5):
            await submitter.finalize_due()
        assert len(reads) == 1
        submitter.status_interval = 0  # the periodic read of every open batch
        await submitter.finalize_due()
        assert len(reads) == 2
        submitter.status_interval = 30.0
        await world.chain.increase_time(submitter.challenge_window + 1)
        await submitter.finalize_due()
        assert (await journal.depth())[State.FINALIZED] == 2 and submitter.stats.finalized == 1
        await submitter.finalize_due()
        assert len(reads) == 3  # a finalized batch is not asked about again
    finally:
        await journal.close()
        await chain.close()
