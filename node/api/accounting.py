"""The HTTP side of attribution: the signed-request headers in, the usage record out.

A request is signed when it carries `X-OpenLoRA-Request` (the `InferenceRequest` in its JSON wire form) and
`X-OpenLoRA-Signature` (0x r||s||v). `admit` reads them before the model name is resolved (refusing an
unsigned request where signatures are required), `precheck` runs the checks that need no adapter, still before
the name is resolved, and `authorise` turns the request into a `Grant` (or refuses with the check's status and
code) before anything is generated; `record` signs and journals the answer's usage record
before the response completes (docs/dapp.md).

| node                  | unsigned request            | signed request                  |
|-----------------------|-----------------------------|---------------------------------|
| no chain              | served, no record (free)    | 422 attribution_unavailable     |
| chain                 | 401 signature_required      | checked, served, recorded       |
| chain, allow_unsigned | served free, journaled free | checked, served, recorded       |
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from eth_account import Account
from eth_utils import is_hex_address, to_checksum_address

from attribution.accounting import Accountant, Admitted, Grant
from attribution.checks import RequestRefused
from attribution.errors import AttributionError, ChainError, SignatureError
from attribution.signing import address_of
from attribution.types import Domain, InferenceRequest, Signature
from attribution.wire import REQUEST_HEADER, SIGNATURE_HEADER, Receipt
from node.adapters.errors import AdapterUnavailableError
from node.api.adapters import resolve_adapter
from node.api.errors import (
    ERROR_TYPES,
    APIError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from node.api.keys import ACCOUNTANT, ENGINE, METRICS
from node.api.schemas import AttributionInfo, PayerPosition
from node.config import Settings


class ConfigurationError(AttributionError, ValueError):
    """The node's attribution settings are incomplete (a start-up error: one clear line, exit 1)."""


class RefusedError(APIError, PermissionError):
    """A signed request the node refused before generating: nothing reserved (except a replay's interval), nothing charged."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = ERROR_TYPES.get(status, "invalid_request_error")

    @classmethod
    def of(cls, refusal: RequestRefused) -> RefusedError:
        return cls(refusal.status, refusal.code, refusal.message)


def signed_request(request: web.Request) -> tuple[InferenceRequest, Signature] | None:
    """The signed request in the headers, or None when there is none; malformed headers are a 400 / 401."""
    raw, signature = request.headers.get(REQUEST_HEADER), request.headers.get(SIGNATURE_HEADER)
    if raw is None and signature is None:
        return None
    if raw is None or signature is None:
        missing = REQUEST_HEADER if raw is None else SIGNATURE_HEADER
        raise RefusedError(400, "invalid_signed_request", f"A signed request needs both headers; {missing} is missing.")
    try:
        parsed = InferenceRequest.from_wire(json.loads(raw))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        raise RefusedError(400, "invalid_signed_request", f"{REQUEST_HEADER} is not a valid request: {exc}") from None
    try:
        return parsed, Signature.from_hex(signature)
    except SignatureError as exc:
        raise RefusedError(401, "invalid_signature", f"{SIGNATURE_HEADER}: {exc}.") from None


def admit(request: web.Request) -> tuple[InferenceRequest, Signature] | None:
    """Phase 0, before the body's model name is resolved or the chain is read: the signed request in the
    headers, or None for a request to serve free. Refuses what needs no chain to refuse (malformed headers,
    a signed request on a node without a chain, an unsigned one on a node that requires signatures), so
    unsigned requests naming unknown adapters cost a node that requires signatures no RPC reads."""
    accountant = request.app.get(ACCOUNTANT)
    signed = signed_request(request)
    if accountant is None:
        if signed is not None:
            raise RefusedError(
                422, "attribution_unavailable", "This node has no chain configured; send the request unsigned."
            )
        return None
    if signed is None and not accountant.allow_unsigned:
        raise RefusedError(
            401, "signature_required", f"This node serves signed requests only ({REQUEST_HEADER}, {SIGNATURE_HEADER})."
        )
    return signed


async def precheck(
    request: web.Request, signed: tuple[InferenceRequest, Signature] | None, body: bytes, input_tokens: int
) -> Admitted | None:
    """Phase 1a, for what `admit` let through, before the body's model name is resolved: the checks a signed
    request passes without its adapter (`Accountant.precheck`), so a garbage signature or a payer with no
    escrow here costs no name resolution. None for a request to serve free (unsigned)."""
    accountant = request.app.get(ACCOUNTANT)
    if accountant is None or signed is None:
        return None
    with _refusals(request):
        return await accountant.precheck(*signed, body, input_tokens)


async def authorise(
    request: web.Request, admitted: Admitted | None, model: str, adapter_cid: str | None, is_adapter: bool
) -> Grant | None:
    """Phase 1b, once the name is resolved: the grant to serve a prechecked request, or None to serve it free
    (unsigned). Raises `RefusedError` when it must not be served."""
    accountant = request.app.get(ACCOUNTANT)
    if accountant is None or admitted is None:
        return None
    if is_adapter and adapter_cid is None:
        raise RefusedError(
            422, "adapter_not_registered", "This adapter is not content-addressed, so it cannot be paid for on chain."
        )
    with _refusals(request):
        return await accountant.grant(admitted, model, adapter_cid)


@contextlib.contextmanager
def _refusals(request: web.Request) -> Iterator[None]:
    """A check's refusal becomes the API's error, counted by its code."""
    try:
        yield
    except RequestRefused as exc:
        request.app[METRICS].refusals.labels(exc.code).inc()
        raise RefusedError.of(exc) from None


async def record(
    request: web.Request, grant: Grant | None, adapter: str, text: str, output_tokens: int
) -> Receipt | None:
    """Phase 3: the signed, durably journaled usage record (None for free requests, which are journaled
    as free entries on a chain-backed node)."""
    accountant = request.app.get(ACCOUNTANT)
    if accountant is None:
        return None
    if grant is None:
        await accountant.record_free(adapter, text, output_tokens)
        return None
    receipt = await accountant.record(grant, text, output_tokens)
    request.app[METRICS].observe_record(grant.adapter, grant.request.input_tokens, output_tokens, receipt.record.charge)
    return receipt


def release(request: web.Request, grant: Grant | None) -> None:
    """A granted request that ends without an answer: no record, no charge."""
    accountant = request.app.get(ACCOUNTANT)
    if accountant is not None and grant is not None:
        accountant.release(grant)


@asynccontextmanager
async def open_accounting(settings: Settings) -> AsyncIterator[Accountant]:
    """Connects to the chain named by the settings and opens the journal; yields the node's accountant."""
    from attribution.chain import Chain
    from attribution.deploy import Contracts, Deployments
    from attribution.keys import load_keystore, parse_raw_key, read_password
    from attribution.ledger import ChainLedger
    from attribution.storage import SqliteJournal
    from attribution.submitter import Submitter

    if settings.deployments is None:
        raise ConfigurationError("a chain needs --deployments (the JSON `openlora chain deploy` writes)")
    chain = await Chain.connect(settings.chain_rpc_url, fees=settings.fee_policy())
    try:
        deployments = Deployments.load(settings.deployments)
        contracts = Contracts.attach(chain, deployments)
        if settings.node_keystore is not None:
            password = read_password(
                settings.node_key_password_file,
                settings.node_key_password.get_secret_value() if settings.node_key_password else None,
            )
            key = load_keystore(settings.node_keystore, password)
        elif settings.node_private_key is not None:
            key = parse_raw_key(settings.node_private_key.get_secret_value(), chain.chain_id)
        else:
            raise ConfigurationError("a chain needs the record-signing key: --node-keystore (or a raw key on a devnet)")
        settlement = contracts.settlement
        max_ttl = await settlement._call("maxRequestTtl")
        commit_delay = await settlement._call("maxCommitDelay")
        journal = SqliteJournal(settings.journal_file)
        try:
            ledger = ChainLedger(contracts)
            accountant = Accountant(
                domain=Domain(chain.chain_id, settlement.address),
                node=settings.node_address or address_of(key),
                key=key,
                ledger=ledger,
                journal=journal,
                max_request_ttl=max_ttl,
                commit_margin=max_ttl + commit_delay,
                allow_unsigned=settings.allow_unsigned,
            )
            accountant.max_commit_delay = commit_delay
            submitter = Submitter(
                journal=journal,
                contracts=contracts,
                sender=Account.from_key(key),
                node=accountant.node,
                publish=_publisher(settings),
                batch_dir=settings.journal_file.parent / "batches",
                max_records=settings.batch_max_records,
                interval=settings.batch_interval,
                max_commit_delay=commit_delay,
                challenge_window=await settlement._call("challengeWindow"),
                confirmations=settings.confirmations,
                on_collected=functools.partial(ledger.collected, accountant.node),
            )
            accountant.on_record = submitter.notify
            accountant.submitter = submitter
            task = asyncio.create_task(submitter.run(), name="openlora-submitter")
            try:
                yield accountant
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await journal.close()
    finally:
        await chain.close()


def _publisher(settings: Settings) -> Callable[[Path], Awaitable[str]]:
    """Batch files go to the node's IPFS node (its Kubo RPC API), pinned: auditors fetch them by CID."""
    from node.adapters.ipfs import KuboRpcClient, import_file

    api_url = settings.ipfs_api_url
    if api_url is None:
        raise ConfigurationError("batch files are published to IPFS: configure --ipfs-api-url (Kubo's RPC API)")

    async def publish(path: Path) -> str:
        dag = await asyncio.to_thread(import_file, path)
        async with KuboRpcClient(api_url) as client:
            await client.dag_import(dag.car_chunks())
            await client.pin_add(dag.root)
        return str(dag.root)

    return publish


async def model_terms(app: web.Application, name: str) -> dict[str, str]:
    """adapterId, priceIn and priceOut of a model on a chain-backed node ({} elsewhere, or when the adapter
    is not registered or the chain cannot be read: the listing never fails because of the chain)."""
    accountant = app.get(ACCOUNTANT)
    if accountant is None:
        return {}
    engine = app[ENGINE]
    try:
        adapter_id = 0
        if name != engine.model_name:
            cid = (await resolve_adapter(app, name)).cid
            if cid is None:  # a local adapter directory: not content-addressed, so not payable
                return {}
            adapter_id = await accountant.ledger.adapter_id(cid)
        terms = await accountant.ledger.terms(adapter_id, accountant.node, int(time.time()))
    except (LookupError, ChainError, APIError, AdapterUnavailableError):
        return {}
    return {"adapterId": str(adapter_id), "priceIn": str(terms.price_in), "priceOut": str(terms.price_out)}


async def attribution_info(request: web.Request) -> web.Response:
    """What a dApp needs to sign for this node: the EIP-712 domain, the node, its record signer, the limits."""
    accountant = _accountant(request)
    try:
        fee = (await accountant.ledger.terms(0, accountant.node, int(time.time()))).fee_per_token
    except ChainError:
        raise ServiceUnavailableError(
            "The chain cannot be read right now; retry shortly.", code="chain_unavailable"
        ) from None
    info = AttributionInfo(
        chainId=accountant.domain.chain_id,
        settlement=accountant.domain.verifying_contract,
        node=accountant.node,
        signer=accountant.signer,
        nodeFeePerToken=str(fee),
        maxRequestTtl=accountant.max_request_ttl,
        maxCommitDelay=accountant.max_commit_delay,
        allowUnsigned=accountant.allow_unsigned,
    )
    return web.json_response(text=info.model_dump_json())


async def payer_info(request: web.Request) -> web.Response:
    """A payer's position with this node: the highest cumulativeCap accepted (sign above it) and free escrow."""
    accountant = _accountant(request)
    payer = request.match_info["payer"]
    if not is_hex_address(payer):
        raise InvalidRequestError(f"'{payer}' is not a 0x address.", param="payer", code="invalid_value")
    payer = to_checksum_address(payer)
    try:
        available = await accountant.ledger.escrow_available(payer, accountant.node)
    except ChainError:
        raise ServiceUnavailableError(
            "The chain cannot be read right now; retry shortly.", code="chain_unavailable"
        ) from None
    uncommitted = await accountant.journal.uncommitted_charge(payer)
    position = PayerPosition(
        payer=payer,
        cumulativeCap=str(await accountant.journal.highest_cap(payer)),
        available=str(max(available - uncommitted, 0)),
    )
    return web.json_response(text=position.model_dump_json())


def _accountant(request: web.Request) -> Accountant:
    accountant = request.app.get(ACCOUNTANT)
    if accountant is None:
        raise NotFoundError(
            "This node has no chain configured: requests are served unsigned and free.", code="attribution_unavailable"
        )
    return accountant


async def sample_metrics(app: web.Application) -> None:
    """Journal depth, commit lag and the submitter's counters into the metrics, at scrape time."""
    accountant = app.get(ACCOUNTANT)
    if accountant is None:
        return
    metrics = app[METRICS]
    for state, count in (await accountant.journal.depth()).items():
        metrics.journal_entries.labels(state.value).set(count)
    from attribution.storage import State

    oldest = await accountant.journal.in_state(State.RECORDED, limit=1)
    metrics.commit_lag.set(time.time() - oldest[0].recorded_at if oldest else 0)
    stats = accountant.submitter.stats
    for event, value in (("committed", stats.committed), ("finalized", stats.finalized), ("voided", stats.voided)):
        metrics.batches.labels(event).set(value)
    metrics.chain_errors.set(stats.chain_errors)
    metrics.tx_replacements.set(accountant.submitter.chain.replacements)
