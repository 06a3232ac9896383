"""The pipeline under faults, on a real local network: an RPC outage while serving, a cheating node caught
by the auditor and slashed, and a node SIGKILLed while 100 paid streams run."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from eth_account import Account

from attribution.aggregation import BatchLeaf, Voucher, build_batch
from attribution.auditor import Auditor
from attribution.caps import CapLedger
from attribution.chain import Chain
from attribution.client import OpenLoRAClient
from attribution.deploy import Contracts, Deployments
from attribution.devchain import dev_private_keys, free_port
from attribution.keys import load_keystore
from attribution.signing import address_of, sign_request, sign_usage_record
from attribution.storage import SqliteJournal, State
from attribution.types import InferenceRequest, UsageRecord
from attribution.wire import prompt_hash
from node.adapters.ipfs import fetch_verified
from node.api.keys import ACCOUNTANT, ENGINE
from node.config import Settings
from node.devnet import local_network
from tests.adapters.conftest import serve_process

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="function")]


def tiny_settings(tiny_model_dir: Path, work: Path) -> Settings:
    return Settings(
        port=0, model=str(tiny_model_dir), served_model_name="tiny", cache_dir=work / "cache", num_kv_blocks=512,
        max_loras=4, dtype="float32",
    )  # fmt: skip


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)


async def depth(journal) -> dict[State, int]:
    return await journal.depth()


class Proxy:
    """A TCP proxy in front of the chain's RPC that can be cut (connections refused) and restored."""

    def __init__(self) -> None:
        self.target_port = 0
        self.port = 0  # the kernel's choice at the first start, the same one after a cut
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def test_rpc_outage_serving_continues_and_commits_land_after(tiny_model_dir: Path, tmp_path: Path) -> None:
    proxy = Proxy()
    await proxy.start()  # listening before the chain's port is probed: the probe cannot return its port
    chain_port = proxy.target_port = free_port()
    settings = tiny_settings(tiny_model_dir, tmp_path)
    async with local_network(
        settings, tmp_path / "devnet", chain_port=chain_port, ipfs_repo=tmp_path / "ipfs", batch_interval=1.0,
        chain_rpc_url=f"http://127.0.0.1:{proxy.port}",
    ) as net:  # fmt: skip
        journal, submitter = net.app[ACCOUNTANT].journal, net.app[ACCOUNTANT].submitter
        key = net.provisioned.payer_key.read_text().strip()
        async with OpenLoRAClient(
            net.url, key, tokenizer=tiny_model_dir, ledger=CapLedger(tmp_path / "caps.json")
        ) as client:
            model = net.app[ENGINE].model_name
            await client.chat(model, [{"role": "user", "content": "warm"}], max_tokens=2)  # the ledger's cache
            await proxy.cut()
            errors_before = submitter.stats.chain_errors
            answers = [await client.chat(model, [{"role": "user", "content": f"q{i}"}], max_tokens=2) for i in range(5)]
            assert all(a.record.charge > 0 for a in answers)  # served while the chain is unreachable

            async def failed() -> bool:
                return submitter.stats.chain_errors > errors_before

            await wait_for(failed, 30, "a failed submission")
            assert (await depth(journal))[State.RECORDED] + (await depth(journal))[State.BATCHED] >= 5
            await proxy.start()  # the chain is back: the submitter's retries land

            async def committed() -> bool:
                d = await depth(journal)
                return d[State.RECORDED] == d[State.BATCHED] == 0

            await wait_for(committed, 90, "every record committed after the outage")
    await proxy.cut()


async def test_cheating_node_is_caught_challenged_and_slashed(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path)
    async with local_network(settings, tmp_path / "devnet", ipfs_repo=tmp_path / "ipfs", batch_interval=1.0) as net:
        accountant = net.app[ACCOUNTANT]
        domain, node = accountant.domain, accountant.node
        node_key = load_keystore(net.provisioned.keystore, net.provisioned.password_file.read_text().strip())
        payer_key = net.provisioned.payer_key.read_text().strip()
        chain = accountant.submitter.chain
        contracts = Contracts.attach(chain, Deployments.load(net.provisioned.deployments))
        fee = (await accountant.ledger.terms(0, node, int(time.time()))).fee_per_token
        now = await chain.timestamp()

        def leaf(cap: int, charge_bump: int = 0, signer: str = payer_key) -> BatchLeaf:
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"cheat {cap}"}]}
            request = InferenceRequest(
                address_of(payer_key), node, 0, prompt_hash(body), 10, 10, 10**16, cap, now + 100
            )
            charge = fee * 20 + charge_bump
            record = UsageRecord(request.digest(domain), 0, 10, 0, charge, b"\x00" * 32, now)
            return BatchLeaf(
                request, sign_request(request, domain, signer), record, sign_usage_record(record, domain, node_key)
            )

        base = 10**22  # far above anything the real client allocated
        voucher = leaf(base + 10**20)
        cases = {
            "overcharge": [leaf(base + 10**16, charge_bump=1)],
            "forged": [leaf(base + 2 * 10**16, signer=dev_private_keys(7)[6])],
        }
        sender = Account.from_key(node_key)
        committed: dict[str, int] = {}
        for name, leaves in cases.items():
            batch = build_batch(leaves, {voucher.request.payer: Voucher(voucher.request, voucher.signature)})
            path = tmp_path / f"{name}.json"
            path.write_bytes(batch.file_bytes(chain.chain_id, contracts.settlement.address, node))
            cid = await accountant.submitter.publish(path)
            committed[name], _ = await contracts.settlement.commit_batch(sender, node, batch, cid)
        # The duplicate: a second batch serving the overcharge's interval again (honestly priced).
        dup = build_batch([leaf(base + 10**16)], {voucher.request.payer: Voucher(voucher.request, voucher.signature)})
        path = tmp_path / "dup.json"
        path.write_bytes(dup.file_bytes(chain.chain_id, contracts.settlement.address, node))
        committed["duplicate"], _ = await contracts.settlement.commit_batch(
            sender, node, dup, await accountant.submitter.publish(path)
        )

        async def fetch(cid: str) -> bytes:
            out = await fetch_verified(cid, [net.ipfs.gateway_url], tmp_path / "fetched", max_bytes=1 << 24)
            return out.read_bytes()

        auditor = Auditor(contracts, fetch)
        report = await auditor.run(node)
        kinds = {(f.batch_id, f.kind) for f in report.findings}
        assert (committed["overcharge"], "invalid_record") in kinds
        assert (committed["forged"], "invalid_record") in kinds
        assert any(kind == "duplicate" for _, kind in kinds)
        challenger = Account.from_key(dev_private_keys(6)[5])
        stake_before = (await contracts.nodes.node_of(node)).stake
        # The duplicate first: a proof comparing with a batch that is already voided no longer applies.
        for finding in sorted((f for f in report.findings if f.provable), key=lambda f: f.kind != "duplicate"):
            header = await contracts.settlement.batch_of(finding.batch_id)
            if header.status == 3:
                continue  # voided by an earlier proof
            await auditor.challenge(report, finding, challenger)
            assert (await contracts.settlement.batch_of(finding.batch_id)).status == 3
        assert (await contracts.nodes.node_of(node)).stake < stake_before
        assert await contracts.settlement.claimable_of(challenger.address) > 0


@pytest.mark.timeout(900)
async def test_sigkill_while_streaming_loses_and_doubles_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path)
    async with local_network(
        settings, tmp_path / "devnet", ipfs_repo=tmp_path / "ipfs", serve=False, batch_interval=1.0
    ) as net:
        s = net.settings
        # `serve --port 0`, its URL read from its log: a port probed free before the network started could be
        # taken by anvil or the IPFS node meanwhile, or by anyone between the kill and the restart.
        args = [
            "--model", s.model, "--served-model-name", "tiny", "--cache-dir", str(s.cache_dir), "--dtype", "float32",
            "--num-kv-blocks", "1024", "--max-num-seqs", "8", "--chain-rpc-url", s.chain_rpc_url,
            "--deployments", str(s.deployments), "--node-keystore", str(s.node_keystore),
            "--node-key-password-file", str(s.node_key_password_file), "--journal-path", str(s.journal_path),
            "--batch-interval", "1", "--ipfs-gateway", s.ipfs_gateways[0], "--ipfs-api-url", s.ipfs_api_url,
            "--adapter-index", str(s.adapter_index),
        ]  # fmt: skip
        key = net.provisioned.payer_key.read_text().strip()
        models = [*net.provisioned.adapters, "tiny"]
        completed = []
        with serve_process(*args) as node:
            async with OpenLoRAClient(
                node.url, key, tokenizer=tiny_model_dir, ledger=CapLedger(tmp_path / "caps.json")
            ) as client:

                async def one(i: int) -> None:
                    stream = client.stream_chat(
                        models[i % len(models)], [{"role": "user", "content": f"n{i}"}], max_tokens=24
                    )
                    with contextlib.suppress(Exception):
                        async for _ in stream:
                            pass
                        completed.append(stream.answer)
                        if len(completed) == 10:
                            # Killed at once, not on the next poll: with at most 8 sequences at a time the
                            # node is still working through the other 90, however fast the machine.
                            node.proc.send_signal(signal.SIGKILL)

                tasks = [asyncio.create_task(one(i)) for i in range(100)]
                await asyncio.wait_for(asyncio.gather(*tasks), 300)
                node.proc.wait()
        assert 10 <= len(completed) < 100
        with serve_process(*args) as node:  # restart: recovery commits what the journal holds
            chain = await Chain.connect(s.chain_rpc_url)
            contracts = Contracts.attach(chain, Deployments.load(s.deployments))

            async def settled() -> bool:
                async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as response:
                    text = await response.text()
                waiting = [line for line in text.splitlines() if line.startswith("openlora_journal_entries{")]
                return all(
                    line.endswith(" 0.0") for line in waiting if 'state="recorded"' in line or 'state="batched"' in line
                )

            await wait_for(settled, 180, "every record committed after the restart")
        journal = SqliteJournal(s.journal_path)
        try:
            for answer in completed:  # every completed response has exactly one record, committed
                entry = await journal.get(answer.record.request_digest)
                assert entry is not None and entry.state is State.COMMITTED
                assert entry.usage.record == answer.record
        finally:
            await journal.close()
        logs = await contracts.settlement.contract.events.BatchCommitted.get_logs(from_block=0)
        leaves = []
        for log in logs:  # every committed record exactly once across all batches
            batch = await _batch_from_ipfs(log["args"]["cid"], s.ipfs_gateways[0], tmp_path)
            leaves.extend(leaf.record.request_digest for leaf in batch.payer_leaves)
        assert len(leaves) == len(set(leaves))
        assert {a.record.request_digest for a in completed} <= set(leaves)
        await chain.close()


async def _batch_from_ipfs(cid: str, gateway: str, tmp: Path):
    from attribution.aggregation import load_batch

    path = await fetch_verified(cid, [gateway], tmp / "batches", max_bytes=1 << 26)
    return load_batch(path.read_bytes()).batch
