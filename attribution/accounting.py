"""The node's side of protocol v2 for one request: authorise before generating, record before answering.

`Accountant.precheck` runs the checks of `attribution.checks` that need no adapter (cheap ones first, then
the signer's authorisation and the escrow, cached chain reads) before the node resolves the model name;
`Accountant.grant` runs the adapter's and price checks and the journal's atomic interval reservation at the
very end, so a refused request reserves nothing, and returns a `Grant`. `Accountant.record` prices the answer with the terms the grant fixed, signs the usage record with
the node's key and appends it to the journal durably, and only then returns what the response carries. So:
no record, no charge; no completed response without a durable record.

`servedAt` is the time the node accepted the request (authorise), not when generation ended: it lies in
[deadline - maxRequestTtl, deadline] by the deadline check, and it fixes the terms version the request was
priced with, so a slow generation can never produce a record the contract would call late or mispriced.

Unsigned requests on a node with a chain are refused unless `allow_unsigned`; then they are served free and
journaled as free entries (charge 0, never batched).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from attribution import checks
from attribution.checks import RequestRefused, SignerStatus, Terms
from attribution.errors import ChainError, IntervalConflict
from attribution.signing import address_of, sign_usage_record
from attribution.storage import Usage
from attribution.types import BASE_MODEL_ADAPTER_ID, Domain, InferenceRequest, Signature, UsageRecord
from attribution.wire import Receipt, response_hash


class Ledger(Protocol):
    """What the node reads from the chain to authorise a request (implementations cache with a short TTL)."""

    async def signer_status(self, payer: str, signer: str) -> SignerStatus | None: ...

    async def escrow_available(self, payer: str, node: str) -> int:
        """The account's balance minus what is thawing (thawing funds can leave before the node commits)."""
        ...

    async def adapter_id(self, cid: str) -> int:
        """The registry id of an adapter CID; raises LookupError when it is not registered."""
        ...

    async def terms(self, adapter_id: int, node: str, at: int) -> Terms: ...


@dataclass(frozen=True, slots=True, eq=False)
class Grant:
    """A request the node accepted: what it may generate and how the answer is priced. Compared by identity:
    the accountant releases each grant once, however often its holder's cleanup asks."""

    request: InferenceRequest
    signature: Signature
    signer: str
    terms: Terms
    accepted_at: int  # becomes the record's servedAt
    adapter: str  # the adapter's CID, "" for the base model

    @property
    def max_tokens(self) -> int:
        return self.request.max_tokens


@dataclass(frozen=True, slots=True)
class Admitted:
    """A signed request whose checks that need no adapter passed (`Accountant.precheck`)."""

    request: InferenceRequest
    signature: Signature
    signer: str
    accepted_at: int


@asynccontextmanager
async def _chain_readable() -> AsyncIterator[None]:
    """A chain read that fails inside is a retryable 503 refusal."""
    try:
        yield
    except ChainError as exc:
        raise RequestRefused(
            "chain",
            f"The chain cannot be read right now ({exc}); retry shortly.",
            status=503,
            code="chain_unavailable",
            retryable=True,
        ) from None


class Accountant:
    """Authorises signed requests and records their answers for one node."""

    def __init__(
        self,
        *,
        domain: Domain,
        node: str,
        key: bytes,
        ledger: Ledger,
        journal: Any,
        max_request_ttl: int,
        commit_margin: int,
        allow_unsigned: bool = False,
        on_record: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.domain = domain
        self.node = node
        self._key = key
        self.signer = address_of(key)
        self.ledger = ledger
        self.journal = journal
        self.max_request_ttl = max_request_ttl
        self.commit_margin = commit_margin  # how long a signer must stay valid for what we serve now
        self.allow_unsigned = allow_unsigned
        self.on_record = on_record  # e.g. wakes the submitter
        self.clock = clock
        self._in_flight: dict[str, int] = {}  # payer -> maxCharge of granted requests not yet recorded
        self._live: set[Grant] = set()  # the grants counted in `_in_flight`
        # payer -> (escrow checks reading its journaled charges now, maxCharge of grants journaled meanwhile)
        self._reading: dict[str, tuple[int, int]] = {}

    async def authorise(
        self,
        request: InferenceRequest,
        signature: Signature,
        body: bytes,
        model: str,
        adapter_cid: str | None,
        input_tokens: int,
    ) -> Grant:
        """`precheck` then `grant`, for a request whose adapter is already resolved."""
        return await self.grant(await self.precheck(request, signature, body, input_tokens), model, adapter_cid)

    async def precheck(
        self, request: InferenceRequest, signature: Signature, body: bytes, input_tokens: int
    ) -> Admitted:
        """The checks that need no adapter, run before the body's model name is resolved (a name can cost a
        registry read and an IPFS fetch): the signature, this node, the deadline, the interval, the prompt
        hash and input tokens, the signer's authorisation, and escrow enough for `maxCharge`. A key that
        signs garbage, or a payer with no escrow here, is refused at the cost of at most two cached reads.
        Raises `RequestRefused`; nothing is reserved."""
        now = int(self.clock())
        signer = checks.check_signature(request, signature, self.domain)
        checks.check_node(request, self.node)
        checks.check_deadline(request, now, self.max_request_ttl)
        checks.check_interval(request)
        checks.check_prompt_hash(request, body)
        checks.check_input_tokens(request, input_tokens)
        async with _chain_readable():
            if signer != request.payer:
                checks.check_signer(
                    request, signer, await self.ledger.signer_status(request.payer, signer), now, self.commit_margin
                )
            await self._check_escrow(request)
        return Admitted(request, signature, signer, now)

    async def grant(self, admitted: Admitted, model: str, adapter_cid: str | None) -> Grant:
        """The rest of the checks, once the name is resolved: `model` is the name the body asks for,
        `adapter_cid` the CID it resolved to (None: the base model). Checks the signed adapter id and its
        price, the escrow again (it may have been spent meanwhile), then reserves the request's interval
        (the journal's atomic uniqueness check) and returns the grant. Raises `RequestRefused` (nothing
        reserved, nothing charged). A chain that cannot be read is a retryable 503: serving blind could
        spend escrow that is not there."""
        request, now = admitted.request, admitted.accepted_at
        async with _chain_readable():
            adapter_id = BASE_MODEL_ADAPTER_ID
            if adapter_cid is not None:
                try:
                    adapter_id = await self.ledger.adapter_id(adapter_cid)
                except LookupError:
                    raise RequestRefused(
                        "adapter",
                        f"The adapter {adapter_cid} is not registered on chain, so it cannot be paid for.",
                        status=422,
                        code="adapter_not_registered",
                    ) from None
            checks.check_adapter(request, adapter_id, model, adapter_cid)
            try:
                terms = await self.ledger.terms(adapter_id, self.node, now)
            except LookupError:
                raise RequestRefused(
                    "adapter",
                    f"Adapter {adapter_id} is retired or has no terms in force.",
                    status=422,
                    code="adapter_retired",
                ) from None
            checks.check_price(request, terms)
            # No await between this escrow check and counting the grant in flight: two concurrent requests
            # of one payer cannot both spend the same free escrow.
            await self._check_escrow(request)
            self._in_flight[request.payer] = self._in_flight.get(request.payer, 0) + request.max_charge
        grant = Grant(request, admitted.signature, admitted.signer, terms, now, adapter_cid or "")
        self._live.add(grant)
        try:
            await self.journal.reserve(request.payer, *request.interval)
        except IntervalConflict as exc:
            self._release(grant)
            raise RequestRefused(
                "unique",
                f"This request's interval overlaps one this node already accepted from the payer: {exc}. "
                "Sign a new request above the payer's highest cumulativeCap (GET /v1/attribution/payers/<payer>).",
                status=409,
                code="request_conflict",
            ) from None
        except BaseException:
            self._release(grant)
            raise
        return grant

    async def _check_escrow(self, request: InferenceRequest) -> None:
        """The payer's free escrow with this node, less its charges not yet committed and its grants in
        flight, covers `maxCharge`. Its last statement has no await after it: callers count the grant in
        flight right after.

        The journal's answer is a snapshot taken on another thread; by the time this task resumes, a grant
        may have been journaled after the snapshot and left `_in_flight`, so it is in neither. Such grants
        are counted from `_reading` (their maxCharge: at worst counted twice, never missed)."""
        payer = request.payer
        available = await self.ledger.escrow_available(payer, self.node)
        readers, before = self._reading.get(payer, (0, 0))
        self._reading[payer] = (readers + 1, before)
        try:
            uncommitted = await self.journal.uncommitted_charge(payer)
        finally:
            readers, journaled = self._reading[payer]
            self._reading[payer] = (readers - 1, journaled)
            if readers == 1:
                del self._reading[payer]
        in_flight = self._in_flight.get(payer, 0) + journaled - before
        checks.check_escrow(request, available, uncommitted + in_flight)

    def _release(self, grant: Grant, journaled: bool = False) -> None:
        """Stops counting `grant` in flight, once: later calls do nothing. `journaled`: its record is in the
        journal now, where an escrow check reading the journal meanwhile may not have seen it."""
        if grant not in self._live:
            return
        self._live.remove(grant)
        payer, charge = grant.request.payer, grant.request.max_charge
        left = self._in_flight[payer] - charge
        if left:
            self._in_flight[payer] = left
        else:
            del self._in_flight[payer]
        if journaled and payer in self._reading:
            readers, meanwhile = self._reading[payer]
            self._reading[payer] = (readers, meanwhile + charge)

    def release(self, grant: Grant) -> None:
        """Ends a grant that produced no answer (engine failure, client gone before any token): no record,
        no charge. Its interval stays reserved: the signed request can never be served again."""
        self._release(grant)

    async def record(self, grant: Grant, text: str, output_tokens: int) -> Receipt:
        """Signs and durably journals the record of an answer; returns it once it is on disk."""
        request = grant.request
        adapter_amount, charge = grant.terms.charge(request.input_tokens, output_tokens)
        record = UsageRecord(
            request_digest=request.digest(self.domain),
            terms_version=grant.terms.terms_version,
            output_tokens=output_tokens,
            adapter_amount=adapter_amount,
            charge=charge,
            response_hash=response_hash(text),
            served_at=grant.accepted_at,
        )
        receipt = Receipt(
            request, grant.signature, record, sign_usage_record(record, self.domain, self._key), self.node, self.signer
        )
        try:
            await self.journal.append(Usage(request, grant.signature, record, receipt.signature, grant.adapter))
        finally:
            # now counted by the journal's uncommitted charge (or never charged: counted as journaled all the
            # same, since an append whose waiter was cancelled still lands)
            self._release(grant, journaled=True)
        if self.on_record is not None:
            self.on_record()
        return receipt

    async def record_free(self, adapter: str, text: str, output_tokens: int) -> None:
        """Journals an unsigned request served free (`allow_unsigned`): counted, never charged or batched."""
        record = UsageRecord(secrets.token_bytes(32), 0, output_tokens, 0, 0, response_hash(text), int(self.clock()))
        await self.journal.append(Usage(None, None, record, None, adapter))
