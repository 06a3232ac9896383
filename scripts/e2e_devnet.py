"""End to end on a real local network: a payer pays per request, records settle, contributors get paid.

Anvil, a local IPFS node, the contracts, a staked node and a funded payer (`node.devnet.local_network`);
then N signed requests (half of them streamed) round-robin over the demo adapters and the base model,
sent with the dApp client library, each answer's usage record verified by the client. The node batches,
publishes and commits; the chain's clock jumps past the challenge window; the node finalizes; revenue is
distributed. Checked, independently of the node: every record a client received is in exactly one
finalized batch on chain (none lost, none doubled), every contributor's claimable OPEN equals what the
received records and the registry's splits say to the wei, and the auditor, from the chain and IPFS alone,
finds nothing. Last line: `RESULT requests=<n> settled=<n> lost=0 doubled=0 audit=clean`.

    .venv/bin/python scripts/e2e_devnet.py [--quick] [--requests N] [--model DIR] [--engine vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.auditor import Auditor  # noqa: E402
from attribution.caps import CapLedger  # noqa: E402
from attribution.client import OpenLoRAClient  # noqa: E402
from attribution.deploy import Contracts, Deployments  # noqa: E402
from attribution.storage import State  # noqa: E402
from node.api.keys import ACCOUNTANT  # noqa: E402
from node.config import Settings  # noqa: E402
from node.devnet import DEVNET_CONFIG, local_network  # noqa: E402
from node.engine.prepare import prepare_model  # noqa: E402

BPS = 10_000
PROMPTS = ("What is the capital of France?", "Name a prime number.", "Say hello.", "Count to three.")


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def send_all(url: str, key: str, model_dir: Path, models: list[str], n: int, state: Path, max_tokens: int):
    """n paid requests, four at a time; returns the verified answers."""
    async with OpenLoRAClient(url, key, tokenizer=model_dir, ledger=CapLedger(state)) as client:
        gate = asyncio.Semaphore(4)

        async def one(i: int):
            model = models[i % len(models)]
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            async with gate:
                if i % 2:
                    stream = client.stream_chat(model, messages, max_tokens=max_tokens, temperature=0)
                    async for _ in stream:
                        pass
                    return stream.answer
                return await client.chat(model, messages, max_tokens=max_tokens, temperature=0)

        return await asyncio.gather(*(one(i) for i in range(n)))


async def run(requests: int, model: str | None, max_tokens: int, **node_settings) -> dict:
    settings = Settings(port=0, model=model, max_loras=4, **node_settings)
    model_dir = prepare_model(settings, progress=False)
    settings = settings.model_copy(update={"model": str(model_dir)})
    with tempfile.TemporaryDirectory(prefix="openlora-e2e-") as tmp:
        work = Path(tmp)
        async with local_network(
            settings, work / "devnet", ipfs_repo=work / "ipfs", batch_interval=2.0, batch_max_records=16
        ) as net:
            return await pay_and_settle(net, requests, max_tokens, work / "caps.json")


async def pay_and_settle(net, requests: int, max_tokens: int, caps: Path) -> dict:
    """Paid requests through `net`'s node, then commit, finalize and distribute, checked independently
    (see settle_and_check). The node must commit often (a short batch interval)."""
    accountant = net.app[ACCOUNTANT]
    journal, submitter = accountant.journal, accountant.submitter
    models = [*net.provisioned.adapters, accountant_model(net)]
    key = net.provisioned.payer_key.read_text().strip()
    started = time.perf_counter()
    answers = await send_all(net.url, key, Path(net.settings.model), models, requests, caps, max_tokens)
    served_s = time.perf_counter() - started

    async def all_committed() -> bool:
        depth = await journal.depth()
        return depth[State.RECORDED] == depth[State.BATCHED] == 0

    await wait_for(all_committed, 120, "every record to be committed")
    chain = submitter.chain
    await chain.increase_time(DEVNET_CONFIG["challenge_window"] + 1)

    async def all_finalized() -> bool:
        depth = await journal.depth()
        return depth[State.COMMITTED] == 0

    await wait_for(all_finalized, 120, "every batch to be finalized")
    contracts = Contracts.attach(chain, Deployments.load(net.provisioned.deployments))
    return await settle_and_check(net, contracts, answers, served_s)


def accountant_model(net) -> str:
    from node.api.keys import ENGINE

    return net.app[ENGINE].model_name


async def settle_and_check(net, contracts, answers, served_s: float) -> dict:
    journal = net.app[ACCOUNTANT].journal
    settlement = contracts.settlement
    fee_bps = await settlement._call("protocolFeeBps")
    # Which batch each received record went into, per the journal; the chain must hold exactly those.
    batch_of: dict[bytes, int] = {}
    for answer in answers:
        entry = await journal.get(answer.record.request_digest)
        batch_of[answer.record.request_digest] = entry.batch_id if entry and entry.state is State.FINALIZED else -1
    lost = sum(1 for b in batch_of.values() if b == -1)
    finalized = [await settlement.batch_of(i) for i in net.app[ACCOUNTANT].submitter.stats.ids.values()]
    on_chain = sum(header.status == 2 for header in finalized)
    committed_records = sum(
        log["args"]["count"] for log in await settlement.contract.events.BatchCommitted.get_logs(from_block=0)
    )
    doubled = committed_records - (len(answers) - lost)  # records the chain holds beyond the received ones
    # Expected contributor earnings from the received records alone: per batch and (adapter, version), the
    # revenue less the protocol share (rounded per batch, as finalize does), split once by the registry.
    revenue: dict[tuple[int, int, int], int] = defaultdict(int)
    for answer in answers:
        request, record = answer.receipt.request, answer.record
        revenue[(batch_of[record.request_digest], request.adapter_id, record.terms_version)] += record.adapter_amount
    earned: dict[tuple[int, int], int] = defaultdict(int)
    for (_, adapter, version), amount in revenue.items():
        earned[(adapter, version)] += amount - amount * fee_bps // BPS
    expected: dict[str, int] = defaultdict(int)
    sender = net.app[ACCOUNTANT].submitter.sender
    for (adapter, version), amount in earned.items():
        if adapter == 0 or amount == 0:
            continue
        await settlement.distribute(sender, adapter, version)
        contributors, shares = await contracts.adapters.split(adapter, version)
        rest = amount
        for contributor, bps in list(zip(contributors, shares, strict=True))[1:]:
            expected[contributor] += amount * bps // BPS
            rest -= amount * bps // BPS
        expected[contributors[0]] += rest
    paid = {c: await settlement.claimable_of(c) for c in expected}
    mismatched = {c: (paid[c], expected[c]) for c in expected if paid[c] != expected[c]}

    async def fetch(cid: str) -> bytes:
        from node.adapters.ipfs import fetch_verified

        with tempfile.TemporaryDirectory() as tmp:
            return (await fetch_verified(cid, [net.ipfs.gateway_url], Path(tmp), max_bytes=1 << 30)).read_bytes()

    report = await Auditor(contracts, fetch).run(net.app[ACCOUNTANT].node)
    audit_ok = report.clean and report.contributors == expected
    return {
        "requests": len(answers),
        "settled": len(answers) - lost,
        "lost": lost,
        "doubled": doubled,
        "batches": on_chain,
        "contributors": len(expected),
        "mismatched": mismatched,
        "audit": "clean" if audit_ok else f"{len(report.findings)} findings",
        "served_s": served_s,
        "charged": sum(a.record.charge for a in answers),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 requests instead of 50")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--model", default=None, help="a local HF model dir (default: the bundled SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--engine", choices=["openlora", "vllm"], default="openlora", help="the node's engine")
    parser.add_argument("--vllm-python", type=Path, default=None, help="with --engine vllm: its environment's Python")
    args = parser.parse_args()
    n = args.requests or (12 if args.quick else 50)
    result = asyncio.run(run(n, args.model, args.max_tokens, engine=args.engine, vllm_python=args.vllm_python))
    print(f"{'requests':>10} {'settled':>8} {'batches':>8} {'lost':>5} {'doubled':>8} {'contributors':>13} "
          f"{'charged (OPEN)':>15} {'served in':>10}")  # fmt: skip
    print(f"{result['requests']:>10} {result['settled']:>8} {result['batches']:>8} {result['lost']:>5} "
          f"{result['doubled']:>8} {result['contributors']:>13} {result['charged'] / 1e18:>15.6f} "
          f"{result['served_s']:>9.1f}s")  # fmt: skip
    if result["mismatched"]:
        print(f"contributors paid differently than the records say: {result['mismatched']}")
    print(
        f"RESULT requests={result['requests']} settled={result['settled']} lost={result['lost']} "
        f"doubled={result['doubled']} audit={result['audit']}"
    )
    ok = not result["mismatched"] and result["lost"] == result["doubled"] == 0 and result["audit"] == "clean"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
