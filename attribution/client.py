"""The dApp side of pay-per-request inference: build a body, sign what it costs, send it, verify the bill.

    async with OpenLoRAClient("http://127.0.0.1:8000", payer_key, tokenizer=model_dir) as client:
        answer = await client.chat("SmolLM2-135M-Instruct", [{"role": "user", "content": "Hi"}], max_tokens=64)
        print(answer.text, answer.record.charge)

For each request the client
1. builds the exact JSON body it will POST (`build_chat_body` / `build_completion_body`);
2. computes what the payer signs (an `InferenceRequest`): the prompt hash of that body, the input tokens
   counted with the base model's tokenizer and chat template (`attribution.tokens`), `maxTokens`,
   `maxCharge` (the model's prices and the node's fee times the caps, unless given), the next
   `cumulativeCap` interval from the local ledger (`attribution.caps`), synced with the node once per
   payer and again after a 409, and `deadline = now + ttl`;
3. signs it with the payer's key or a signer key the payer authorised, and sends body and signature
   with the official `openai` client (`extra_headers`), streaming or not;
4. verifies the node's receipt: the request it echoes is ours, the record's `requestDigest` is our
   request's digest, the record's signature recovers to the node's signer from `GET /v1/attribution`,
   `outputTokens <= maxTokens`, `charge <= maxCharge`, and `responseHash` is the hash of the text we got.

The wire format is in `attribution.wire` and docs/dapp.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
from eth_utils import is_hex_address, to_checksum_address

from attribution.caps import UINT128_MAX, CapAccount, CapLedger
from attribution.errors import (
    ClientError,
    NodeRefusedError,
    NodeUnavailableError,
    RecordError,
    RequestBuildError,
    SignatureError,
)
from attribution.signing import address_of, recover, sign_request
from attribution.tokens import InputTokenCounter
from attribution.types import BASE_MODEL_ADAPTER_ID, Domain, InferenceRequest, Signature, UsageRecord
from attribution.wire import (
    RECEIPT_EVENT_OBJECT,
    RECEIPT_FIELD,
    REQUEST_HEADER,
    Receipt,
    prompt_hash,
    request_headers,
    response_hash,
)

UINT32_MAX = (1 << 32) - 1
DEFAULT_MAX_TOKENS = 256
DEFAULT_TTL = 60  # seconds from signing to the deadline; capped by the node's maxRequestTtl


def _uint(data: Mapping[str, Any], name: str, *, where: str) -> int:
    """An unsigned integer field sent as a decimal string (or a JSON integer)."""
    value = data.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise NodeUnavailableError(f"{where}: field {name!r} is missing or not an unsigned integer: {value!r}")


def _optional_uint(data: Mapping[str, Any], name: str, *, where: str) -> int | None:
    return None if data.get(name) is None else _uint(data, name, where=where)


def _address(data: Mapping[str, Any], name: str, *, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not is_hex_address(value):
        raise NodeUnavailableError(f"{where}: field {name!r} is missing or not a 0x address")
    return to_checksum_address(value)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """`GET /v1/attribution`: the EIP-712 domain to sign under, the node, its record signer, its limits.
    `node_fee_per_token` is the node's fee (OPEN wei per token) when the node advertises it."""

    domain: Domain
    node: str
    signer: str
    max_request_ttl: int
    max_commit_delay: int
    node_fee_per_token: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> NodeInfo:
        where = "GET /v1/attribution"
        if not isinstance(data, Mapping):
            raise NodeUnavailableError(f"{where}: not a JSON object")
        return cls(
            domain=Domain(_uint(data, "chainId", where=where), _address(data, "settlement", where=where)),
            node=_address(data, "node", where=where),
            signer=_address(data, "signer", where=where),
            max_request_ttl=_uint(data, "maxRequestTtl", where=where),
            max_commit_delay=_uint(data, "maxCommitDelay", where=where),
            node_fee_per_token=_optional_uint(data, "nodeFeePerToken", where=where),
        )


@dataclass(frozen=True, slots=True)
class ModelTerms:
    """A `/v1/models` entry's billing terms: the adapter id (0: the base model) and its prices per token
    (OPEN wei; None where the node publishes none)."""

    model: str
    adapter_id: int
    price_in: int | None
    price_out: int | None

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ModelTerms:
        where = f"GET /v1/models entry {entry.get('id')!r}"
        if entry.get("adapterId") is None:
            raise NodeUnavailableError(f"{where} has no adapterId: the node is not chain-backed (no payment needed)")
        return cls(
            model=str(entry.get("id")),
            adapter_id=_uint(entry, "adapterId", where=where),
            price_in=_optional_uint(entry, "priceIn", where=where),
            price_out=_optional_uint(entry, "priceOut", where=where),
        )


def build_chat_body(
    model: str, messages: Sequence[Mapping[str, Any]], *, max_tokens: int, stream: bool = False, **options: Any
) -> dict[str, Any]:
    """The exact JSON object POSTed to /v1/chat/completions. `options` are further OpenAI fields
    (temperature, top_p, seed, stop, ...); `max_tokens` is always set, it is what the payer signs."""
    if not messages:
        raise RequestBuildError("a chat request needs at least one message")
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens}
    return _finish_body(body, stream, options)


def build_completion_body(
    model: str, prompt: str | Sequence[int], *, max_tokens: int, stream: bool = False, **options: Any
) -> dict[str, Any]:
    """The exact JSON object POSTed to /v1/completions (a text prompt or token ids)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
    }
    return _finish_body(body, stream, options)


def _finish_body(body: dict[str, Any], stream: bool, options: Mapping[str, Any]) -> dict[str, Any]:
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= UINT32_MAX:
        raise RequestBuildError(f"max_tokens must be an integer in [1, {UINT32_MAX}], got {max_tokens!r}")
    # max_completion_tokens would override the max_tokens the payer signs; the other is the other endpoint's.
    clash = sorted(set(options) & {"messages", "prompt", "max_completion_tokens"})
    if clash:
        raise RequestBuildError(f"{', '.join(clash)} cannot be given as options here (the signed body sets them)")
    body.update({k: v for k, v in options.items() if v is not None})
    if stream:
        body["stream"] = True
    return body


def max_charge_for(terms: ModelTerms, input_tokens: int, max_tokens: int, node_fee_per_token: int = 0) -> int:
    """The most a request can cost: (priceIn + fee) * inputTokens + (priceOut + fee) * maxTokens, at least 1
    wei (a request must authorise a non-empty interval, even a free one)."""
    if terms.adapter_id == BASE_MODEL_ADAPTER_ID:
        price_in = price_out = 0  # the base model earns no adapter revenue: the node's fee only
    elif terms.price_in is None or terms.price_out is None:
        raise RequestBuildError(f"the node publishes no prices for {terms.model!r}; give maxCharge explicitly")
    else:
        price_in, price_out = terms.price_in, terms.price_out
    cap = (price_in + node_fee_per_token) * input_tokens + (price_out + node_fee_per_token) * max_tokens
    return max(cap, 1)


@dataclass(frozen=True, slots=True)
class Answer:
    """A verified answer: the text and the node's receipt, whose record has passed `verify_receipt`."""

    text: str
    receipt: Receipt

    @property
    def record(self) -> UsageRecord:
        return self.receipt.record

    def summary(self) -> str:
        """One line: what the node billed, for which tokens."""
        r, req = self.receipt.record, self.receipt.request
        return (
            f"verified usage record: charge {r.charge} wei (max {req.max_charge}), tokens in "
            f"{req.input_tokens} out {r.output_tokens} (max {req.max_tokens}), node {self.receipt.node}"
        )


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A body and the request signed for it, ready to send."""

    endpoint: str  # "chat/completions" or "completions"
    body: dict[str, Any]
    request: InferenceRequest
    signature: Signature
    domain: Domain

    @property
    def headers(self) -> dict[str, str]:
        return request_headers(self.request, self.signature)


def sign_body(
    body: Mapping[str, Any],
    private_key: bytes | str,
    *,
    info: NodeInfo,
    payer: str,
    adapter_id: int,
    input_tokens: int,
    max_charge: int,
    cumulative_cap: int,
    deadline: int,
) -> SignedRequest:
    """Signs the InferenceRequest for `body` (maxTokens = the body's max_tokens) with the payer's key or an
    authorised signer's; RequestBuildError when a field does not fit its EIP-712 type or the interval is empty."""
    request = InferenceRequest(
        payer=payer,
        node=info.node,
        adapter_id=adapter_id,
        prompt_hash=prompt_hash(body),
        input_tokens=input_tokens,
        max_tokens=body["max_tokens"],
        max_charge=max_charge,
        cumulative_cap=cumulative_cap,
        deadline=deadline,
    )
    if not request.well_formed:
        raise RequestBuildError(f"maxCharge {max_charge} and cumulativeCap {cumulative_cap} make an empty interval")
    try:
        signature = sign_request(request, info.domain, private_key)
    except ValueError as exc:  # a value that does not fit its uint type, or a malformed key
        raise RequestBuildError(f"cannot sign the request: {exc}") from None
    endpoint = "chat/completions" if "messages" in body else "completions"
    return SignedRequest(endpoint, dict(body), request, signature, info.domain)


def verify_receipt(receipt: Receipt, signed: SignedRequest, text: str, node_signer: str) -> None:
    """Checks a node's receipt against the request we signed and the text we received; raises RecordError."""
    request, record, domain = signed.request, receipt.record, signed.domain
    if receipt.request != request:
        raise RecordError("the receipt's request is not the request we signed")
    if record.request_digest != request.digest(domain):
        raise RecordError("the record's requestDigest is not our request's digest")
    if receipt.node != request.node:
        raise RecordError(f"the receipt names node {receipt.node}, we signed for {request.node}")
    if receipt.signer != node_signer:
        raise RecordError(f"the receipt names signer {receipt.signer}, the node's signer is {node_signer}")
    try:
        signer = recover(record.digest(domain), receipt.signature)
    except SignatureError as exc:
        raise RecordError(f"the record's signature is invalid: {exc}") from None
    if signer != node_signer:
        raise RecordError(f"the record is signed by {signer}, not by the node's signer {node_signer}")
    if record.output_tokens > request.max_tokens:
        raise RecordError(f"the record bills {record.output_tokens} output tokens, over maxTokens {request.max_tokens}")
    if record.charge > request.max_charge:
        raise RecordError(f"the record charges {record.charge} wei, over maxCharge {request.max_charge}")
    if record.response_hash != response_hash(text):
        raise RecordError("the record's responseHash is not the hash of the text we received")


class AnswerStream:
    """The text deltas of a streamed answer (`async for delta in stream`); once the stream is exhausted,
    `answer` holds the verified Answer (the full text and the receipt)."""

    def __init__(self, run: Callable[[AnswerStream], AsyncGenerator[str, None]]) -> None:
        self.answer: Answer | None = None
        self._deltas = run(self)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas

    async def aclose(self) -> None:
        await self._deltas.aclose()


class OpenLoRAClient:
    """Sends signed requests to one node and verifies what it bills. Not bound to a model: pass it per call.

    `private_key` is the payer's, or a signer's the payer authorised (then give `payer`). `tokenizer` is the
    node's base model directory (or an InputTokenCounter). `ledger` keeps the cumulativeCap counters
    (default: ~/.local/state/openlora/cumulative-caps.json). `node_fee_per_token` overrides what the node
    advertises when computing maxCharge."""

    def __init__(
        self,
        base_url: str,
        private_key: bytes | str,
        *,
        tokenizer: str | Path | InputTokenCounter,
        payer: str | None = None,
        ledger: CapLedger | None = None,
        ttl: int = DEFAULT_TTL,
        node_fee_per_token: int | None = None,
        timeout: float = 600.0,
    ) -> None:
        try:
            self.signer = address_of(private_key)
        except (SignatureError, ValueError) as exc:
            raise RequestBuildError(f"invalid private key: {exc}") from None
        if payer is not None and not is_hex_address(payer):
            raise RequestBuildError(f"payer {payer!r} is not a 0x address")
        self.payer = to_checksum_address(payer) if payer else self.signer
        self._key = private_key
        self._counter = tokenizer if isinstance(tokenizer, InputTokenCounter) else None
        self._tokenizer_dir = None if isinstance(tokenizer, InputTokenCounter) else tokenizer
        self.ledger = ledger or CapLedger()
        if ttl <= 0:
            raise RequestBuildError(f"ttl must be positive, got {ttl}")
        self.ttl = ttl
        self.node_fee_per_token = node_fee_per_token
        self.base_url = base_url.rstrip("/")
        self._http = openai.DefaultAsyncHttpx2Client(timeout=timeout, event_hooks={"request": [check_sent_body]})
        # No automatic retries: a resent signed request is a replay the node refuses (409); we retry ourselves.
        self._openai = openai.AsyncOpenAI(
            base_url=self.base_url + "/v1", api_key="openlora", http_client=self._http, max_retries=0
        )
        self._info: NodeInfo | None = None
        self._synced: set[str] = set()

    async def __aenter__(self) -> OpenLoRAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._openai.close()

    # -- what the node publishes ---------------------------------------------------------------------

    async def info(self) -> NodeInfo:
        """`GET /v1/attribution` (fetched once per client)."""
        if self._info is None:
            try:
                data = await self._get_json("/v1/attribution")
            except NodeRefusedError as exc:
                if exc.status != 404:
                    raise
                raise NodeUnavailableError(
                    f"the node at {self.base_url} takes no paid requests (no /v1/attribution): without a chain it "
                    "serves unsigned requests for free"
                ) from None
            self._info = NodeInfo.from_json(data)
        return self._info

    async def terms(self, model: str) -> ModelTerms:
        """The adapter id and prices of `model` from `GET /v1/models`."""
        listing = await self._get_json("/v1/models")
        entries = listing.get("data") if isinstance(listing, Mapping) else None
        if not isinstance(entries, list):
            raise NodeUnavailableError("GET /v1/models: no 'data' list")
        for entry in entries:
            if isinstance(entry, Mapping) and entry.get("id") == model:
                return ModelTerms.from_json(entry)
        names = ", ".join(str(e.get("id")) for e in entries if isinstance(e, Mapping))
        raise RequestBuildError(f"the node serves no model {model!r} (it serves: {names})")

    async def resync(self) -> int:
        """Raises the local cumulativeCap counter to the highest the node has seen for the payer; returns it."""
        info = await self.info()
        where = f"GET /v1/attribution/payers/{self.payer}"
        data = await self._get_json(where.removeprefix("GET "))
        if not isinstance(data, Mapping):
            raise NodeUnavailableError(f"{where}: not a JSON object")
        seen = _uint(data, "cumulativeCap", where=where)
        account = self._account(info)
        self._synced.add(account.key)
        return await asyncio.to_thread(self.ledger.observe, account, seen)

    # -- one request ---------------------------------------------------------------------------------

    async def prepare(self, body: Mapping[str, Any], *, max_charge: int | None = None) -> SignedRequest:
        """Counts, prices, allocates an interval for, and signs `body` (a chat or completion body)."""
        prompt_hash(body)  # refuses a body JSON cannot carry exactly before anything is allocated
        info = await self.info()
        account = self._account(info)
        if account.key not in self._synced:
            await self.resync()
        input_tokens = await asyncio.to_thread(self._token_counter().count, body)
        if input_tokens > UINT32_MAX:
            raise RequestBuildError(f"the prompt has {input_tokens} tokens, more than a uint32")
        terms = await self.terms(body["model"])
        if max_charge is None:
            fee = self.node_fee_per_token if self.node_fee_per_token is not None else info.node_fee_per_token or 0
            max_charge = max_charge_for(terms, input_tokens, body["max_tokens"], fee)
        elif not 1 <= max_charge <= UINT128_MAX:
            raise RequestBuildError(f"maxCharge must be in [1, 2**128 - 1] wei, got {max_charge}")
        cumulative_cap = await asyncio.to_thread(self.ledger.allocate, account, max_charge)
        deadline = int(time.time()) + min(self.ttl, info.max_request_ttl)
        return sign_body(
            body,
            self._key,
            info=info,
            payer=self.payer,
            adapter_id=terms.adapter_id,
            input_tokens=input_tokens,
            max_charge=max_charge,
            cumulative_cap=cumulative_cap,
            deadline=deadline,
        )

    async def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_charge: int | None = None,
        **options: Any,
    ) -> Answer:
        """A chat completion, paid and verified."""
        return await self.send(build_chat_body(model, messages, max_tokens=max_tokens, **options), max_charge)

    async def completion(
        self,
        model: str,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_charge: int | None = None,
        **options: Any,
    ) -> Answer:
        """A text completion, paid and verified."""
        return await self.send(build_completion_body(model, prompt, max_tokens=max_tokens, **options), max_charge)

    def stream_chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_charge: int | None = None,
        **options: Any,
    ) -> AnswerStream:
        """A streamed chat completion: iterate the deltas, then read `.answer`."""
        body = build_chat_body(model, messages, max_tokens=max_tokens, stream=True, **options)
        return AnswerStream(lambda stream: self._stream(stream, body, max_charge))

    def stream_completion(
        self,
        model: str,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_charge: int | None = None,
        **options: Any,
    ) -> AnswerStream:
        """A streamed text completion: iterate the deltas, then read `.answer`."""
        body = build_completion_body(model, prompt, max_tokens=max_tokens, stream=True, **options)
        return AnswerStream(lambda stream: self._stream(stream, body, max_charge))

    async def send(self, body: Mapping[str, Any], max_charge: int | None = None) -> Answer:
        """Signs and sends a non-streaming body (from build_chat_body / build_completion_body), verifies the
        receipt. A 409 `request_conflict` resyncs the counter and retries once with a new interval."""
        if body.get("stream"):
            raise RequestBuildError("a streaming body goes through stream_chat / stream_completion")
        signed, response = await self._open(body, max_charge)
        return await self._answer(signed, response)

    async def send_signed(self, signed: SignedRequest) -> Answer:
        """Sends a non-streaming request signed earlier with `prepare` (a dApp that signs ahead, or
        elsewhere) and verifies the receipt. No retry: a 409 means its interval was used, and only a
        new signature can fix that."""
        if signed.body.get("stream"):
            raise RequestBuildError("a streaming body goes through stream_chat / stream_completion")
        try:
            response = await self._post(signed)
        except openai.APIError as exc:
            raise _node_error(exc) from None
        return await self._answer(signed, response)

    async def _answer(self, signed: SignedRequest, response: Any) -> Answer:
        data = response.to_dict()
        choices = data.get("choices") or []
        if not choices:
            raise NodeUnavailableError("the node's answer has no choices")
        if signed.endpoint == "chat/completions":
            text = (choices[0].get("message") or {}).get("content") or ""
        else:
            text = choices[0].get("text") or ""
        if RECEIPT_FIELD not in data:
            raise RecordError(
                f"the answer carries no usage record (no {RECEIPT_FIELD!r} field): is the node chain-backed?"
            )
        receipt = Receipt.from_json(data[RECEIPT_FIELD])
        verify_receipt(receipt, signed, text, (await self.info()).signer)
        return Answer(text, receipt)

    async def _stream(
        self, stream: AnswerStream, body: dict[str, Any], max_charge: int | None
    ) -> AsyncGenerator[str, None]:
        signed, events = await self._open(body, max_charge)
        parts: list[str] = []
        receipt_json: Any = None
        try:
            async for chunk in events:
                data = chunk.to_dict()
                if data.get("object") == RECEIPT_EVENT_OBJECT:
                    if receipt_json is not None:
                        raise RecordError("the stream carries two usage records")
                    receipt_json = data.get(RECEIPT_FIELD)
                    continue
                for choice in data.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if delta:
                        if receipt_json is not None:
                            raise RecordError("the stream sent text after its usage record")
                        parts.append(delta)
                        yield delta
        except openai.APIError as exc:
            raise _node_error(exc) from None
        finally:
            await events.close()
        if receipt_json is None:
            raise RecordError("the stream ended without a usage record event")
        text = "".join(parts)
        receipt = Receipt.from_json(receipt_json)
        verify_receipt(receipt, signed, text, (await self.info()).signer)
        stream.answer = Answer(text, receipt)

    async def _open(self, body: Mapping[str, Any], max_charge: int | None) -> tuple[SignedRequest, Any]:
        """Sends the body signed; on 409 request_conflict resyncs and sends it once more, signed anew."""
        for attempt in (1, 2):
            signed = await self.prepare(body, max_charge=max_charge)
            try:
                return signed, await self._post(signed)
            except openai.APIStatusError as exc:
                if exc.status_code == 409 and attempt == 1:
                    await self.resync()
                    continue
                raise _node_error(exc) from None
            except openai.APIError as exc:
                raise _node_error(exc) from None
        raise AssertionError("unreachable")

    async def _post(self, signed: SignedRequest) -> Any:
        body = dict(signed.body)
        model, stream = body.pop("model"), body.pop("stream", False)
        common: dict[str, Any] = {"model": model, "extra_headers": signed.headers, "extra_body": body}
        if stream:
            common["stream"] = True
        if signed.endpoint == "chat/completions":
            return await self._openai.chat.completions.create(messages=body.pop("messages"), **common)
        return await self._openai.completions.create(prompt=body.pop("prompt"), **common)

    # -- helpers -------------------------------------------------------------------------------------

    def _account(self, info: NodeInfo) -> CapAccount:
        return CapAccount(info.domain.chain_id, info.domain.verifying_contract, self.payer, info.node)

    def _token_counter(self) -> InputTokenCounter:
        if self._counter is None:
            self._counter = InputTokenCounter.from_pretrained(self._tokenizer_dir)
        return self._counter

    async def _get_json(self, path: str) -> Any:
        try:
            response = await self._http.get(self.base_url + path)
        except httpx2.HTTPError as exc:
            raise NodeUnavailableError(f"cannot reach the node at {self.base_url}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code != 200:
            error = data.get("error") if isinstance(data, Mapping) else None
            if isinstance(error, Mapping):
                raise NodeRefusedError(response.status_code, error.get("code"), str(error.get("message")))
            raise NodeUnavailableError(f"GET {path}: HTTP {response.status_code}")
        if data is None:
            raise NodeUnavailableError(f"GET {path}: the answer is not JSON")
        return data


async def check_sent_body(request: httpx2.Request) -> None:
    """Request hook: the body that goes on the wire must be the body whose hash was signed."""
    header = request.headers.get(REQUEST_HEADER)
    if header is None:
        return
    signed = json.loads(header)["promptHash"]
    sent = "0x" + prompt_hash(json.loads(request.content)).hex()
    if sent != signed:
        raise RequestBuildError("the HTTP client changed the request body after it was signed")


def _node_error(exc: openai.APIError) -> ClientError:
    """An openai exception as one of ours: a refusal with its status and code, or an unreachable node."""
    if isinstance(exc.__cause__, ClientError):
        return exc.__cause__
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, Mapping) else {}
        return NodeRefusedError(exc.status_code, body.get("code"), str(body.get("message") or exc.message))
    if isinstance(exc, openai.APIConnectionError):
        return NodeUnavailableError(f"cannot reach the node: {exc}")
    return NodeUnavailableError(f"the node failed the request: {exc.message}")
