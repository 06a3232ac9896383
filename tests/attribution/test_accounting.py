"""The node's Accountant over the in-memory journal: the order of its checks, escrow counted with requests
in flight, interval reservation, and records that verify. The chain reads come from `FixedLedger`, a table
of the values the contract views would return (the chain-backed `ChainLedger` is exercised against anvil in
the pipeline tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from attribution.accounting import Accountant
from attribution.checks import RequestRefused, SignerStatus, Terms
from attribution.signing import address_of, recover, sign_request
from attribution.storage import MemoryJournal, State
from attribution.types import Domain, InferenceRequest
from attribution.wire import prompt_hash, response_hash

NODE_KEY = b"\x0a" * 32
PAYER_KEY = b"\x0b" * 32
SIGNER_KEY = b"\x0c" * 32
DOMAIN = Domain(31337, "0x" + "33" * 20)
NOW = 1_800_000_000
CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
BODY = json.dumps({"model": CID, "messages": [{"role": "user", "content": "hi"}]}).encode()
TERMS = Terms(terms_version=1, price_in=2, price_out=3, fee_per_token=1)


class FixedLedger:
    """Chain state as a table: escrow per payer, signer authorisations, one registered adapter."""

    def __init__(self, escrow: int = 10_000) -> None:
        self.escrow = escrow
        self.signers: dict[str, SignerStatus] = {}

    async def signer_status(self, payer: str, signer: str) -> SignerStatus | None:
        return self.signers.get(signer)

    async def escrow_available(self, payer: str, node: str) -> int:
        return self.escrow

    async def adapter_id(self, cid: str) -> int:
        if cid != CID:
            raise LookupError(cid)
        return 7

    async def terms(self, adapter_id: int, node: str, at: int) -> Terms:
        return TERMS if adapter_id == 7 else Terms(0, 0, 0, TERMS.fee_per_token)


def accountant(ledger: FixedLedger | None = None) -> Accountant:
    return Accountant(
        domain=DOMAIN, node=address_of(NODE_KEY), key=NODE_KEY, ledger=ledger or FixedLedger(), journal=MemoryJournal(),
        max_request_ttl=300, commit_margin=900, clock=lambda: NOW,
    )  # fmt: skip


def request(cap: int = 1_000, max_charge: int = 1_000, **changes) -> InferenceRequest:
    fields = dict(
        payer=address_of(PAYER_KEY), node=address_of(NODE_KEY), adapter_id=7, prompt_hash=prompt_hash(json.loads(BODY)),
        input_tokens=12, max_tokens=100, max_charge=max_charge, cumulative_cap=cap, deadline=NOW + 60,
    )  # fmt: skip
    fields.update(changes)
    return InferenceRequest(**fields)


async def authorise(
    acc: Accountant, req: InferenceRequest, key: bytes = PAYER_KEY, body: bytes = BODY, tokens: int = 12
):
    return await acc.authorise(req, sign_request(req, DOMAIN, key), body, CID, CID, tokens)


async def test_grant_record_and_journal() -> None:
    acc = accountant()
    grant = await authorise(acc, request())
    receipt = await acc.record(grant, "Paris.", 5)
    record = receipt.record
    assert record.request_digest == grant.request.digest(DOMAIN)
    assert (record.adapter_amount, record.charge) == TERMS.charge(12, 5) == (2 * 12 + 3 * 5, 39 + 17)
    assert record.served_at == NOW and record.terms_version == 1
    assert record.response_hash == response_hash("Paris.")
    assert recover(record.digest(DOMAIN), receipt.signature) == address_of(NODE_KEY)
    entry = await acc.journal.get(record.request_digest)
    assert entry is not None and entry.state is State.RECORDED
    assert await acc.journal.uncommitted_charge(grant.request.payer) == record.charge
    wire = receipt.to_json()
    assert wire["record"]["charge"] == str(record.charge) and wire["signer"] == address_of(NODE_KEY)


async def test_replayed_or_overlapping_interval_is_409_and_costs_nothing() -> None:
    acc = accountant()
    await acc.record(await authorise(acc, request(cap=1_000)), "a", 1)
    for cap in (1_000, 1_500, 1_999):  # same interval, overlapping from above
        with pytest.raises(RequestRefused) as info:
            await authorise(acc, request(cap=cap))
        assert (info.value.status, info.value.code) == (409, "request_conflict")
    await authorise(acc, request(cap=2_000))  # adjacent: (1000, 2000] is free


async def test_escrow_counts_requests_in_flight() -> None:
    acc = accountant(FixedLedger(escrow=2_500))
    await authorise(acc, request(cap=1_000))
    await authorise(acc, request(cap=2_000))  # 2 x 1000 in flight
    with pytest.raises(RequestRefused) as info:
        await authorise(acc, request(cap=3_000))
    assert (info.value.status, info.value.code, info.value.retryable) == (402, "insufficient_escrow", True)


async def test_concurrent_requests_cannot_overspend() -> None:
    acc = accountant(FixedLedger(escrow=3_000))
    results = await asyncio.gather(
        *(authorise(acc, request(cap=1_000 * (i + 1))) for i in range(6)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 3


async def test_release_frees_escrow_but_not_the_interval() -> None:
    acc = accountant(FixedLedger(escrow=1_000))
    grant = await authorise(acc, request(cap=1_000))
    acc.release(grant)
    with pytest.raises(RequestRefused, match="overlaps"):
        await authorise(acc, request(cap=1_000))
    await authorise(acc, request(cap=2_000))  # the escrow is free again


async def test_refusals_reserve_nothing() -> None:
    acc = accountant()
    req = request()
    for body, tokens, code in (
        (BODY.replace(b"hi", b"yo"), 12, "prompt_hash_mismatch"),
        (BODY, 13, "input_tokens_mismatch"),
    ):
        with pytest.raises(RequestRefused) as info:
            await authorise(acc, req, body=body, tokens=tokens)
        assert info.value.code == code
    await authorise(acc, req)  # the interval was never reserved by the refused attempts


async def test_authorised_signer_and_strangers() -> None:
    ledger = FixedLedger()
    acc = accountant(ledger)
    with pytest.raises(RequestRefused) as info:
        await authorise(acc, request(), key=SIGNER_KEY)
    assert (info.value.status, info.value.code) == (401, "signer_not_authorized")
    ledger.signers[address_of(SIGNER_KEY)] = SignerStatus(NOW - 5)
    grant = await authorise(acc, request(), key=SIGNER_KEY)
    assert grant.signer == address_of(SIGNER_KEY)


async def test_unregistered_adapter_and_wrong_id() -> None:
    acc = accountant()
    req = request()
    with pytest.raises(RequestRefused) as info:
        await acc.authorise(req, sign_request(req, DOMAIN, PAYER_KEY), BODY, "bafy-other", "bafy-other", 12)
    assert info.value.code == "adapter_not_registered"
    wrong = dataclasses.replace(req, adapter_id=8)
    with pytest.raises(RequestRefused) as info:
        await authorise(acc, wrong)
    assert info.value.code == "adapter_mismatch"


async def test_free_entries_are_journaled_never_charged() -> None:
    acc = accountant()
    await acc.record_free("", "hello", 3)
    depth = await acc.journal.depth()
    assert depth[State.FREE] == 1 and depth.get(State.RECORDED, 0) == 0


async def test_a_grant_is_released_once() -> None:
    """A handler that cleans up a grant whose record already released it (a record cancelled by the client
    leaving, or failed) must not free a second request's escrow: before, the second release took another
    grant's maxCharge off the payer's in-flight total (or drove it negative), so the payer was served beyond
    its escrow and the node's stake covered the shortfall."""
    acc = accountant(FixedLedger(escrow=2_000))
    first = await authorise(acc, request(cap=1_000))
    await authorise(acc, request(cap=2_000))  # in flight: 2 x 1000, the escrow is spoken for
    acc.release(first)
    acc.release(first)
    await authorise(acc, request(cap=3_000))  # takes the 1000 the first grant left
    with pytest.raises(RequestRefused) as info:
        await authorise(acc, request(cap=4_000))
    assert info.value.code == "insufficient_escrow"


class SlowReadJournal(MemoryJournal):
    """The in-memory journal whose read of a payer's uncommitted charges comes back only when `resume` is set,
    the way `SqliteJournal`'s read on a worker thread comes back after the event loop has run other tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.resume: asyncio.Event | None = None

    async def uncommitted_charge(self, payer: str) -> int:
        charge = await super().uncommitted_charge(payer)
        if self.resume is not None:
            self.reading.set()
            await self.resume.wait()
        return charge


async def test_a_grant_recorded_while_the_escrow_is_read_still_counts() -> None:
    """A grant journaled between the journal's read of uncommitted charges and the in-flight count is in
    neither unless the check accounts for it: the second request would spend escrow the first one used."""
    journal = SlowReadJournal()
    acc = Accountant(
        domain=DOMAIN, node=address_of(NODE_KEY), key=NODE_KEY, ledger=FixedLedger(escrow=1_200), journal=journal,
        max_request_ttl=300, commit_margin=900, clock=lambda: NOW,
    )  # fmt: skip
    second = request(cap=2_000)
    admitted = await acc.precheck(second, sign_request(second, DOMAIN, PAYER_KEY), BODY, 12)  # 1200 free
    first = await authorise(acc, request(cap=1_000))
    journal.resume = asyncio.Event()
    granting = asyncio.ensure_future(acc.grant(admitted, CID, CID))
    await journal.reading.wait()  # the read has its value: 0 uncommitted, the first request in flight
    receipt = await acc.record(first, "x" * 100, 100)  # journaled (436 wei) and no longer in flight
    journal.resume.set()
    with pytest.raises(RequestRefused) as info:  # 1200 - 436 < 1000
        await granting
    assert info.value.code == "insufficient_escrow"
    assert receipt.record.charge == 436
