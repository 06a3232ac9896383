"""Signed-request headers on a node without a chain: refused clearly, never silently served for free as if paid."""

from __future__ import annotations

import json

import aiohttp
import pytest

from attribution.signing import address_of, sign_request
from attribution.types import Domain, InferenceRequest
from attribution.wire import REQUEST_HEADER, SIGNATURE_HEADER, prompt_hash
from tests.api.conftest import Node, chat_body

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = b"\x05" * 32


def _signed_headers(body: dict) -> dict[str, str]:
    request = InferenceRequest(address_of(KEY), "0x" + "22" * 20, 0, prompt_hash(body), 5, 8, 10**6, 10**6, 2**40)
    signature = sign_request(request, Domain(31337, "0x" + "33" * 20), KEY)
    return {REQUEST_HEADER: json.dumps(request.to_wire()), SIGNATURE_HEADER: signature.to_hex()}


async def _post(http: aiohttp.ClientSession, node: Node, body: dict, headers: dict) -> tuple[int, dict]:
    async with http.post(f"{node.url}/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_signed_request_to_a_node_without_chain_is_refused(node: Node, http: aiohttp.ClientSession) -> None:
    body = chat_body(max_tokens=2)
    status, payload = await _post(http, node, body, _signed_headers(body))
    assert status == 422
    assert payload["error"]["code"] == "attribution_unavailable"


@pytest.mark.parametrize("drop", [REQUEST_HEADER, SIGNATURE_HEADER])
async def test_half_a_signed_request_is_a_400(node: Node, http: aiohttp.ClientSession, drop: str) -> None:
    body = chat_body(max_tokens=2)
    headers = _signed_headers(body)
    del headers[drop]
    status, payload = await _post(http, node, body, headers)
    assert status == 400
    assert payload["error"]["code"] == "invalid_signed_request"
    assert drop in payload["error"]["message"]


async def test_malformed_headers(node: Node, http: aiohttp.ClientSession) -> None:
    body = chat_body(max_tokens=2)
    headers = _signed_headers(body)
    bad_json = {**headers, REQUEST_HEADER: "{not json"}
    assert (await _post(http, node, body, bad_json))[1]["error"]["code"] == "invalid_signed_request"
    compact = {**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER][:-2]}
    status, payload = await _post(http, node, body, compact)
    assert (status, payload["error"]["code"]) == (401, "invalid_signature")
    assert "EIP-2098" in payload["error"]["message"]


async def test_unsigned_requests_are_served_without_a_record(node: Node, http: aiohttp.ClientSession) -> None:
    status, payload = await _post(http, node, chat_body(max_tokens=2), {})
    assert status == 200
    assert "openlora" not in payload
