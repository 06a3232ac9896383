"""The HTTP wire format between a dApp and a node (docs/dapp.md): prompt and response hashes, the two
request headers, and the `openlora` receipt a node returns with every answer.

Both sides use this module: the client to build what it signs and to read the receipt, the node to
check the headers and to write the receipt, so the two cannot drift apart.

    prompt hash   keccak256(RFC 8785 canonical JSON of the exact body POSTed to /v1/chat/completions
                  or /v1/completions)
    response hash keccak256(UTF-8 bytes of the answer text: a chat completion's assistant content, a
                  text completion's text; streamed, the concatenation of every delta in order)
    headers       X-OpenLoRA-Request: the InferenceRequest's wire form as compact JSON
                  X-OpenLoRA-Signature: 0x + r || s || v (65 bytes, v in {27, 28})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785
from eth_hash.auto import keccak
from eth_utils import is_hex_address, to_checksum_address

from attribution.errors import RecordError, RequestBuildError, SignatureError
from attribution.types import InferenceRequest, Signature, UsageRecord

REQUEST_HEADER = "X-OpenLoRA-Request"
SIGNATURE_HEADER = "X-OpenLoRA-Signature"
RECEIPT_FIELD = "openlora"  # beside "usage" in a response body, and in the last streamed event
RECEIPT_EVENT_OBJECT = "openlora.usage_record"  # the `object` of that last streamed event


def canonical_body(body: Mapping[str, Any]) -> bytes:
    """The RFC 8785 (JCS) canonical bytes of a request body; refuses what JSON cannot carry exactly
    (integers beyond +-(2**53 - 1), NaN, infinities, lone surrogates) with a RequestBuildError."""
    try:
        return rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, TypeError) as exc:
        raise RequestBuildError(f"the request body cannot be canonicalised (RFC 8785): {exc}") from exc


def prompt_hash(body: Mapping[str, Any]) -> bytes:
    """keccak256 of the body's canonical JSON: what the payer signs as `promptHash`."""
    return keccak(canonical_body(body))


def response_hash(text: str) -> bytes:
    """keccak256 of the answer's UTF-8 bytes: what the node signs as `responseHash`."""
    return keccak(text.encode("utf-8"))


def request_headers(request: InferenceRequest, signature: Signature) -> dict[str, str]:
    """The two headers that carry a signed request."""
    return {
        REQUEST_HEADER: json.dumps(request.to_wire(), separators=(",", ":")),
        SIGNATURE_HEADER: signature.to_hex(),
    }


def _address(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not is_hex_address(value):
        raise RecordError(f"receipt field {name!r} is not a 0x address")
    return to_checksum_address(value)


def _signature(data: Mapping[str, Any], name: str) -> Signature:
    value = data.get(name)
    if not isinstance(value, str):
        raise RecordError(f"receipt field {name!r} is missing or not a string")
    try:
        return Signature.from_hex(value)
    except SignatureError as exc:
        raise RecordError(f"receipt field {name!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Receipt:
    """The `openlora` object of a response: the request as the node read it, the node-signed usage record,
    and who signed it (`node` is the node's address, `signer` its record-signing key's)."""

    request: InferenceRequest
    request_signature: Signature
    record: UsageRecord
    signature: Signature
    node: str
    signer: str

    @classmethod
    def from_json(cls, data: Any) -> Receipt:
        """Parses the `openlora` object; raises RecordError naming the field that is wrong."""
        if not isinstance(data, Mapping):
            raise RecordError(f"the receipt is not a JSON object (got {type(data).__name__})")
        parsed: dict[str, Any] = {}
        for name, struct in (("request", InferenceRequest), ("record", UsageRecord)):
            try:
                parsed[name] = struct.from_wire(data.get(name))
            except ValueError as exc:
                raise RecordError(f"receipt field {name!r}: {exc}") from None
        return cls(
            request=parsed["request"],
            request_signature=_signature(data, "requestSignature"),
            record=parsed["record"],
            signature=_signature(data, "signature"),
            node=_address(data, "node"),
            signer=_address(data, "signer"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "request": self.request.to_wire(),
            "requestSignature": self.request_signature.to_hex(),
            "record": self.record.to_wire(),
            "signature": self.signature.to_hex(),
            "node": self.node,
            "signer": self.signer,
        }
