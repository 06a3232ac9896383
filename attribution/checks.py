"""The node's checks of a signed request, run before anything is generated (protocol v2, docs/contracts.md).

Each check is one small function named after its rule. It returns nothing (or the value it established)
and raises `RequestRefused` with the HTTP status and OpenAI-style code the API answers with, and whether
the failure is `retryable` (the same request may pass later: escrow topped up, chain reachable again) or
final (only a new request can pass). The node runs them in `node/api/accounting.py` in the order that
refuses cheaply first; uniqueness (the request's interval against every interval already accepted from the
payer) is the journal's atomic `reserve`, so it also holds across restarts.

Time boundaries are inclusive where the contract's are: a request is servable while `now <= deadline`, and a
deadline up to exactly `now + max_ttl` is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from attribution.errors import AttributionError, RequestBuildError, SignatureError
from attribution.signing import recover
from attribution.types import Domain, InferenceRequest, Signature
from attribution.wire import prompt_hash


class RequestRefused(AttributionError, PermissionError):
    """A signed request the node will not serve. Nothing was generated and nothing is charged."""

    def __init__(self, rule: str, message: str, *, status: int, code: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class SignerStatus:
    """A payer's authorisation of a signer key, as the escrow has it: valid in [authorised_at, revoked_at)."""

    authorised_at: int
    revoked_at: int = 0  # 0: not revoked

    def valid_at(self, t: int) -> bool:
        return self.authorised_at <= t and (self.revoked_at == 0 or t < self.revoked_at)


@dataclass(frozen=True, slots=True)
class Terms:
    """What one token costs for a request: the adapter's prices at its terms version and the node's fee."""

    terms_version: int
    price_in: int
    price_out: int
    fee_per_token: int

    def charge(self, input_tokens: int, output_tokens: int) -> tuple[int, int]:
        """(adapterAmount, charge) exactly as the settlement contract recomputes them."""
        adapter_amount = self.price_in * input_tokens + self.price_out * output_tokens
        return adapter_amount, adapter_amount + self.fee_per_token * (input_tokens + output_tokens)


def check_signature(request: InferenceRequest, signature: Signature, domain: Domain) -> str:
    """The signature recovers (low-s, this chain and settlement contract); returns the signer's address."""
    try:
        return recover(request.digest(domain), signature)
    except SignatureError as exc:
        raise RequestRefused(
            "signature", f"The request signature is invalid: {exc}.", status=401, code="invalid_signature"
        ) from None


def check_signer(request: InferenceRequest, signer: str, status: SignerStatus | None, now: int, margin: int) -> None:
    """The signer is the payer, or a key the payer authorised that stays valid for at least `margin` seconds
    (long enough for the node to commit what it serves now: revocation must not strand the charge)."""
    if signer == request.payer:
        return
    if status is None or not status.valid_at(now):
        raise RequestRefused(
            "signer",
            f"{signer} signed the request but is not a signer authorised by the payer {request.payer} "
            "(or the request was signed for another chain or settlement contract).",
            status=401,
            code="signer_not_authorized",
        )
    if status.revoked_at and status.revoked_at - now < margin:
        raise RequestRefused(
            "signer",
            f"The signer {signer} is being revoked by the payer (at {status.revoked_at}); sign with the payer's key.",
            status=401,
            code="signer_revoked",
        )


def check_node(request: InferenceRequest, node: str) -> None:
    """The request names this node (a request for another node must not be served or charged here)."""
    if request.node.lower() != node.lower():
        raise RequestRefused(
            "node", f"The request is for node {request.node}, this node is {node}.", status=403, code="wrong_node"
        )


def check_deadline(request: InferenceRequest, now: int, max_ttl: int) -> None:
    """now <= deadline <= now + max_ttl: not expired, and not so far ahead the contract would refuse the record."""
    if request.deadline < now:
        raise RequestRefused(
            "deadline", f"The request expired at {request.deadline} (now {now}).", status=401, code="request_expired"
        )
    if request.deadline > now + max_ttl:
        raise RequestRefused(
            "deadline",
            f"The deadline {request.deadline} is more than {max_ttl} s ahead (now {now}).",
            status=422,
            code="deadline_too_far",
        )


def check_interval(request: InferenceRequest) -> None:
    """The request authorises a non-empty interval (cumulativeCap - maxCharge, cumulativeCap]."""
    if not request.well_formed:
        raise RequestRefused(
            "interval",
            f"maxCharge must be > 0 and cumulativeCap >= maxCharge (got {request.max_charge}, {request.cumulative_cap}).",
            status=422,
            code="invalid_interval",
        )


def check_prompt_hash(request: InferenceRequest, body: bytes) -> None:
    """The signed promptHash is the hash of this very body (the signature covers what is generated)."""
    try:
        matches = prompt_hash(json.loads(body)) == request.prompt_hash
    except (ValueError, RequestBuildError):  # not JSON, or JSON that RFC 8785 cannot carry exactly
        matches = False
    if not matches:
        raise RequestRefused(
            "prompt_hash",
            "promptHash does not match keccak256 of the RFC 8785 canonical JSON of the request body.",
            status=422,
            code="prompt_hash_mismatch",
        )


def check_adapter(request: InferenceRequest, adapter_id: int, model: str, cid: str | None = None) -> None:
    """The signed adapterId is the registry id of the model the body asks for (0: the base model). `model` is
    the name the client sent, `cid` the CID it resolved to (None for the base model)."""
    if request.adapter_id != adapter_id:
        named = f"'{model}'" if cid is None or cid == model else f"'{model}' (CID {cid})"
        raise RequestRefused(
            "adapter",
            f"adapterId {request.adapter_id} was signed, but {named} is adapter id {adapter_id} on chain.",
            status=422,
            code="adapter_mismatch",
        )


def check_input_tokens(request: InferenceRequest, counted: int) -> None:
    """The signed inputTokens equals the node's count of the prompt (the payer signs what it is billed)."""
    if request.input_tokens != counted:
        raise RequestRefused(
            "input_tokens",
            f"inputTokens {request.input_tokens} was signed, but the prompt is {counted} tokens with this "
            "node's tokenizer and chat template.",
            status=422,
            code="input_tokens_mismatch",
        )


def check_price(request: InferenceRequest, terms: Terms) -> None:
    """maxCharge covers the most this request can cost: the signed input tokens and maxTokens at current prices."""
    _, most = terms.charge(request.input_tokens, request.max_tokens)
    if most > request.max_charge:
        raise RequestRefused(
            "price",
            f"maxCharge {request.max_charge} is below the most this request can cost ({most} wei: "
            f"{request.input_tokens} input and up to {request.max_tokens} output tokens at the current prices).",
            status=402,
            code="max_charge_too_low",
        )


def check_escrow(request: InferenceRequest, available: int, uncommitted: int) -> None:
    """The payer's escrow with this node, less what this node has served but not yet committed, covers maxCharge."""
    free = available - uncommitted
    if free < request.max_charge:
        raise RequestRefused(
            "escrow",
            f"The payer's escrow with this node has {max(free, 0)} wei free ({available} available, {uncommitted} "
            f"not yet settled), less than maxCharge {request.max_charge}. Deposit more for this node.",
            status=402,
            code="insufficient_escrow",
            retryable=True,
        )
