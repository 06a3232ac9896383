"""The public auditor: every batch of a node re-checked from the chain and IPFS alone.

For each `BatchCommitted` event: fetch the batch file by its CID (the caller's fetcher verifies every block
against the CID), rebuild both Merkle-sum trees from its leaves and compare them with the commitment; decode
the committed totals from the commit transaction and compare them with the leaves' honest totals; ask the
contract's own `checkLeaf` about every leaf (signature and signer at commit time, node, deadline, caps,
prices); check the node's signature of every record; and look for one payer interval served twice across
the node's batches. Provable findings carry what `challenge` needs to submit the fraud proof (committed to
first, so the reward cannot be copied).

A file that cannot be fetched, or whose leaves do not rebuild the committed roots, is reported but cannot be
proven on chain (the data is withheld): protocol v2 bounds what that can cost a payer by the cumulative caps
it signed, and what it can cost contributors is what the auditor reports here.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from attribution.aggregation import Batch, Tree, load_batch
from attribution.errors import SignatureError
from attribution.signing import recover
from attribution.types import Domain, intervals_overlap

FRAUD_NAMES = (
    "None", "WrongNode", "RecordMismatch", "BadSignature", "OutsideDeadline", "OverCap", "WrongPrice",
    "SumMismatch", "Misordered", "TotalMismatch", "MissingRecord", "Overlap",
)  # fmt: skip
STATUS_NAMES = {0: "unknown", 1: "pending", 2: "finalized", 3: "voided"}
BPS = 10_000

Fetch = Callable[[str], Awaitable[bytes]]


@dataclass
class Finding:
    """One cheat (or one unprovable problem) in a batch."""

    batch_id: int
    kind: str  # invalid_record | total_mismatch | duplicate | file_unavailable | file_mismatch | record_signature
    detail: str
    provable: bool = False
    tree: Tree = Tree.PAYER
    index: int = 0
    other_batch_id: int = 0
    other_index: int = 0


@dataclass
class AdapterUsage:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    revenue: int = 0  # adapter amounts charged (before the protocol's share)
    earned: int = 0  # what finalize credits the (adapter, version): revenue less the protocol share, per batch


@dataclass
class AuditedBatch:
    batch_id: int
    node: str
    status: str
    cid: str
    records: int
    charge: int
    batch: Batch | None = None  # rebuilt from the file, with the committed totals


@dataclass
class AuditReport:
    batches: list[AuditedBatch] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    usage: dict[tuple[int, int], AdapterUsage] = field(default_factory=lambda: defaultdict(AdapterUsage))
    contributors: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def records(self) -> int:
        return sum(b.records for b in self.batches)


class Auditor:
    def __init__(self, contracts: Any, fetch: Fetch) -> None:
        self.contracts = contracts
        self.settlement = contracts.settlement
        self.fetch = fetch

    async def run(self, node: str | None = None, from_block: int = 0) -> AuditReport:
        report = AuditReport()
        event = self.settlement.contract.events.BatchCommitted
        filters = {"node": to_checksum_address(node)} if node else {}
        logs = await event.get_logs(from_block=from_block, argument_filters=filters)
        domain = Domain(self.settlement.chain.chain_id, self.settlement.address)
        fee_bps = await self.settlement._call("protocolFeeBps")
        seen: dict[tuple[str, str], list[tuple[tuple[int, int], int, int]]] = defaultdict(list)
        for log in sorted(logs, key=lambda entry: entry["args"]["batchId"]):
            audited = await self._audit_batch(log, domain, report)
            report.batches.append(audited)
            if audited.batch is None or audited.status == "voided":
                continue
            self._find_duplicates(audited, seen, report)
            self._count_usage(audited.batch, fee_bps, report)
        await self._split_revenue(report)
        return report

    async def _audit_batch(self, log: Any, domain: Domain, report: AuditReport) -> AuditedBatch:
        args = log["args"]
        batch_id, node, cid = args["batchId"], args["node"], args["cid"]
        header = await self.settlement.batch_of(batch_id)
        audited = AuditedBatch(
            batch_id, node, STATUS_NAMES.get(header.status, "?"), cid, args["count"], args["payerSum"]
        )
        try:
            data = await self.fetch(cid)
        except Exception as exc:  # any gateway failure: the data is not available to us
            report.findings.append(Finding(batch_id, "file_unavailable", f"batch file {cid}: {exc}"))
            return audited
        try:
            batch_file = load_batch(data)
        except ValueError as exc:
            report.findings.append(Finding(batch_id, "file_mismatch", f"batch file {cid} is malformed: {exc}"))
            return audited
        batch = batch_file.batch
        expected = (args["payerRoot"], args["adapterRoot"], args["payerSum"], args["adapterSum"], args["count"])
        rebuilt = (batch.payer_tree.root.hash, batch.adapter_tree.root.hash, batch.payer_tree.root.sum,
                   batch.adapter_tree.root.sum, batch.count)  # fmt: skip
        if (batch_file.node.lower(), batch_file.chain_id) != (node.lower(), domain.chain_id) or expected != rebuilt:
            report.findings.append(
                Finding(batch_id, "file_mismatch", f"the leaves of {cid} do not rebuild the committed trees")
            )
            return audited
        committed = await self._committed_totals(log)
        batch = dataclasses.replace(batch, payer_totals=committed[0], adapter_totals=committed[1])
        audited.batch = batch
        self._check_totals(batch_id, batch, report)
        signer = (await self.contracts.nodes.node_of(node)).signer
        for index, leaf in enumerate(batch.payer_leaves):
            reason = await self.settlement._call("checkLeaf", node, header.committed_at, leaf.as_abi())
            if reason:
                report.findings.append(
                    Finding(batch_id, "invalid_record", f"leaf {index}: {FRAUD_NAMES[reason]}", True, Tree.PAYER, index)
                )
            try:
                ok = (
                    leaf.record_signature is not None
                    and recover(leaf.record.digest(domain), leaf.record_signature) == signer
                )
            except SignatureError:
                ok = False
            if not ok:
                report.findings.append(
                    Finding(batch_id, "record_signature", f"leaf {index}: the record is not signed by {signer}")
                )
        return audited

    async def _committed_totals(self, log: Any) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
        tx = await self.settlement.chain.w3.eth.get_transaction(log["transactionHash"])
        _, params = self.settlement.contract.decode_function_input(tx["input"])
        totals = params["totals"]  # web3 decodes structs as dicts keyed by member name
        payers = [(to_checksum_address(e["payer"]), e["amount"]) for e in totals["payers"]]
        adapters = [(e["adapterId"], e["termsVersion"], e["amount"]) for e in totals["adapters"]]
        return payers, adapters

    @staticmethod
    def _check_totals(batch_id: int, batch: Batch, report: AuditReport) -> None:
        honest = {}
        for leaf in batch.payer_leaves:
            honest[("p", leaf.request.payer)] = honest.get(("p", leaf.request.payer), 0) + leaf.record.charge
            cell = ("a", leaf.request.adapter_id, leaf.record.terms_version)
            honest[cell] = honest.get(cell, 0) + leaf.record.adapter_amount
        for entry, (payer, amount) in enumerate(batch.payer_totals):
            if honest.get(("p", payer), 0) != amount:
                report.findings.append(Finding(batch_id, "total_mismatch", f"payer {payer} charged {amount}", True,
                                               Tree.PAYER, entry))  # fmt: skip
        for entry, (adapter, version, amount) in enumerate(batch.adapter_totals):
            if honest.get(("a", adapter, version), 0) != amount:
                report.findings.append(Finding(batch_id, "total_mismatch", f"adapter {adapter} v{version}: {amount}",
                                               True, Tree.ADAPTER, entry))  # fmt: skip

    @staticmethod
    def _find_duplicates(audited: AuditedBatch, seen: dict, report: AuditReport) -> None:
        assert audited.batch is not None
        for index, leaf in enumerate(audited.batch.payer_leaves):
            key = (audited.node.lower(), leaf.request.payer.lower())
            for interval, other_batch, other_index in seen[key]:
                if other_batch != audited.batch_id and intervals_overlap(interval, leaf.request.interval):
                    report.findings.append(
                        Finding(audited.batch_id, "duplicate", f"leaf {index} overlaps batch {other_batch} leaf "
                                f"{other_index} (payer {leaf.request.payer})", True, Tree.PAYER, index, other_batch,
                                other_index)
                    )  # fmt: skip
            seen[key].append((leaf.request.interval, audited.batch_id, index))

    @staticmethod
    def _count_usage(batch: Batch, fee_bps: int, report: AuditReport) -> None:
        for leaf in batch.payer_leaves:
            usage = report.usage[(leaf.request.adapter_id, leaf.record.terms_version)]
            usage.requests += 1
            usage.input_tokens += leaf.request.input_tokens
            usage.output_tokens += leaf.record.output_tokens
            usage.revenue += leaf.record.adapter_amount
        for adapter, version, amount in batch.adapter_totals:
            report.usage[(adapter, version)].earned += amount - amount * fee_bps // BPS

    async def _split_revenue(self, report: AuditReport) -> None:
        """Contributors' earnings by each version's split, as `distributeAdapterRevenue` pays them (the
        rounding remainder to the first contributor) when it runs once after these batches."""
        for (adapter, version), usage in report.usage.items():
            if adapter == 0 or usage.earned == 0:
                continue
            contributors, shares = await self.contracts.adapters.split(adapter, version)
            rest = usage.earned
            for contributor, bps in list(zip(contributors, shares, strict=True))[1:]:
                part = usage.earned * bps // BPS
                report.contributors[contributor] += part
                rest -= part
            report.contributors[contributors[0]] += rest

    async def challenge(self, report: AuditReport, finding: Finding, sender: LocalAccount) -> Any:
        """Submits the fraud proof of a provable finding; returns the receipt of the voiding transaction."""
        if not finding.provable:
            raise ValueError(f"{finding.kind} cannot be proven on chain")
        batches = {b.batch_id: b.batch for b in report.batches}
        batch = batches[finding.batch_id]
        s = self.settlement
        if finding.kind == "invalid_record":
            return await s.prove_invalid_record(sender, finding.batch_id, batch, finding.tree, finding.index)
        if finding.kind == "total_mismatch":
            return await s.prove_total_mismatch(sender, finding.batch_id, batch, finding.tree, finding.index)
        other = batches[finding.other_batch_id]
        return await s.prove_duplicate(
            sender, finding.batch_id, batch, finding.index, finding.other_batch_id, other, finding.other_index
        )
