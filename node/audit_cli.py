"""`openlora audit`: re-check a node's batches from the chain and IPFS alone; `--challenge` proves the first
provable cheat on chain. Exit status: 0 clean, 2 findings, 1 error."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

OPEN = 10**18


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser(
        "audit", help="re-verify every batch from the chain and IPFS; report usage and cheats"
    )
    audit.add_argument("--rpc-url", required=True, help="the chain's JSON-RPC endpoint")
    audit.add_argument("--deployments", type=Path, required=True, help="the deployments JSON of the contracts")
    audit.add_argument("--ipfs-gateway", action="append", dest="gateways", required=True, metavar="URL",
                       help="trustless gateway to fetch batch files from (repeatable); every block is verified")  # fmt: skip
    audit.add_argument("--node", help="audit this node's batches only (default: every node's)")
    audit.add_argument("--from-block", type=int, default=None, help="first block to read (default: the deployment's)")
    audit.add_argument("--challenge", action="store_true", help="submit the fraud proof of the first provable cheat")
    audit.add_argument("--key-file", type=Path, help="the challenger's private key (hex) for --challenge")
    audit.set_defaults(handler=lambda args: asyncio.run(_audit(args)))


async def _audit(args: argparse.Namespace) -> int:
    from eth_account import Account

    from attribution.auditor import Auditor
    from attribution.chain import Chain
    from attribution.deploy import Contracts, Deployments
    from attribution.errors import AttributionError
    from node.adapters.ipfs import IpfsError, fetch_verified

    console = Console()
    if args.challenge and args.key_file is None:
        console.print("openlora: error: --challenge needs --key-file (the account that submits the proof)")
        return 1

    async def fetch(cid: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="openlora-audit-") as tmp:
            path = await fetch_verified(cid, args.gateways, Path(tmp), max_bytes=1 << 30)
            return path.read_bytes()

    try:
        deployments = Deployments.load(args.deployments)
        chain = await Chain.connect(args.rpc_url)
        try:
            auditor = Auditor(Contracts.attach(chain, deployments), fetch)
            from_block = deployments.block_number if args.from_block is None else args.from_block
            report = await auditor.run(args.node, from_block)
            _print_report(console, report)
            provable = [f for f in report.findings if f.provable]
            if args.challenge and provable:
                key = args.key_file.read_text().strip()
                receipt = await auditor.challenge(report, provable[0], Account.from_key(key))
                console.print(
                    f"challenged batch {provable[0].batch_id}: voided in tx {receipt['transactionHash'].hex()}"
                )
        finally:
            await chain.close()
    except (AttributionError, IpfsError, OSError, ValueError) as exc:
        console.print(f"openlora: error: {' '.join(str(exc).split())}", style="red", highlight=False)
        return 1
    return 0 if report.clean else 2


def _print_report(console: Console, report) -> None:
    batches = Table(title="batches")
    for column in ("id", "node", "status", "records", "charged (OPEN)", "file"):
        batches.add_column(column)
    for b in report.batches:
        batches.add_row(str(b.batch_id), b.node, b.status, str(b.records), f"{b.charge / OPEN:.6f}", b.cid)
    console.print(batches)
    usage = Table(title="usage and revenue by adapter (terms version)")
    for column in (
        "adapter",
        "version",
        "requests",
        "input tokens",
        "output tokens",
        "revenue (OPEN)",
        "earned (OPEN)",
    ):
        usage.add_column(column)
    for (adapter, version), u in sorted(report.usage.items()):
        name = "base model" if adapter == 0 else str(adapter)
        usage.add_row(name, str(version), str(u.requests), str(u.input_tokens), str(u.output_tokens),
                      f"{u.revenue / OPEN:.6f}", f"{u.earned / OPEN:.6f}")  # fmt: skip
    console.print(usage)
    if report.contributors:
        earnings = Table(title="contributors' earnings (after distribution)")
        earnings.add_column("contributor")
        earnings.add_column("OPEN")
        for contributor, amount in sorted(report.contributors.items()):
            earnings.add_row(contributor, f"{amount / OPEN:.6f}")
        console.print(earnings)
    for f in report.findings:
        tag = "provable" if f.provable else "not provable on chain"
        console.print(f"FINDING batch {f.batch_id} {f.kind}: {f.detail} ({tag})", style="red", highlight=False)
    console.print(
        f"audit: {len(report.batches)} batches, {report.records} records, "
        + ("clean" if report.clean else f"{len(report.findings)} findings")
    )
