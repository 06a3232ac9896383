"""The HTTP side of attribution: the signed-request headers in, the usage record out.

A request is signed when it carries `X-OpenLoRA-Request` (the `InferenceRequest` in its JSON wire form) and
`X-OpenLoRA-Signature` (0x r||s||v). `authorise` turns them into a `Grant` (or refuses with the check's
status and code) before anything is generated; `record` signs and journals the answer's usage record before
the response completes (docs/dapp.md).

| node                  | unsigned request            | signed request                  |
|-----------------------|-----------------------------|---------------------------------|
| no chain              | served, no record (free)    | 422 attribution_unavailable     |
| chain                 | 401 signature_required      | checked, served, recorded       |
| chain, allow_unsigned | served free, journaled free | checked, served, recorded       |
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from attribution.accounting import Grant, Receipt
from attribution.checks import RequestRefused
from attribution.errors import SignatureError
from attribution.types import InferenceRequest, Signature
from node.adapters.ipfs_source import IpfsAdapterSource
from node.api.errors import APIError, unknown_model
from node.api.keys import ACCOUNTANT

REQUEST_HEADER = "X-OpenLoRA-Request"
SIGNATURE_HEADER = "X-OpenLoRA-Signature"

_TYPES = {401: "authentication_error", 403: "permission_error"}


class RefusedError(APIError, PermissionError):
    """A signed request the node refused before generating: nothing reserved (except a replay's interval), nothing charged."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = _TYPES.get(status, "invalid_request_error")

    @classmethod
    def of(cls, refusal: RequestRefused) -> RefusedError:
        return cls(refusal.status, refusal.code, refusal.message)


def adapter_cid(engine: Any, name: str | None) -> str | None:
    """The CID of a content-addressed adapter (None for the base model and for local adapter directories)."""
    if name is None or engine.adapters is None:
        return None
    found = engine.adapters.resolve(name)
    if found is None:
        raise unknown_model(name)
    source, key = found
    return key if isinstance(source, IpfsAdapterSource) else None


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


async def authorise(
    request: web.Request, body: bytes, adapter_cid: str | None, is_adapter: bool, input_tokens: int
) -> Grant | None:
    """Phase 1 of a generation request: the grant to serve it, or None to serve it free (no chain, or an
    unsigned request on a node that allows them). Raises `RefusedError` when it must not be served."""
    accountant = request.app.get(ACCOUNTANT)
    signed = signed_request(request)
    if accountant is None:
        if signed is not None:
            raise RefusedError(
                422, "attribution_unavailable", "This node has no chain configured; send the request unsigned."
            )
        return None
    if signed is None:
        if accountant.allow_unsigned:
            return None
        raise RefusedError(
            401, "signature_required", f"This node serves signed requests only ({REQUEST_HEADER}, {SIGNATURE_HEADER})."
        )
    if is_adapter and adapter_cid is None:
        raise RefusedError(
            422, "adapter_not_registered", "This adapter is not content-addressed, so it cannot be paid for on chain."
        )
    try:
        return await accountant.authorise(*signed, body, adapter_cid, input_tokens)
    except RequestRefused as exc:
        raise RefusedError.of(exc) from None


async def record(
    request: web.Request, grant: Grant | None, text: str, prompt_tokens: int, output_tokens: int
) -> Receipt | None:
    """Phase 3: the signed, durably journaled usage record (None for free requests, which are journaled
    as free entries on a chain-backed node)."""
    accountant = request.app.get(ACCOUNTANT)
    if accountant is None:
        return None
    if grant is None:
        await accountant.record_free(prompt_tokens, output_tokens)
        return None
    return await accountant.record(grant, text, output_tokens)


def release(request: web.Request, grant: Grant | None) -> None:
    """A granted request that ends without an answer: no record, no charge."""
    accountant = request.app.get(ACCOUNTANT)
    if accountant is not None and grant is not None:
        accountant.release(grant)
