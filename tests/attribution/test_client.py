"""The dApp client without a node: request bodies, the prompt hash, the signed request and its headers,
the maxCharge rule, the node's published fields, and usage-record verification (every check refuses)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx2
import pytest
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from attribution.client import (
    ModelTerms,
    NodeInfo,
    build_chat_body,
    build_completion_body,
    check_sent_body,
    max_charge_for,
    sign_body,
    verify_receipt,
)
from attribution.errors import NodeUnavailableError, RecordError, RequestBuildError
from attribution.signing import address_of, recover, sign_usage_record
from attribution.types import SECP256K1_N, Domain, InferenceRequest, Signature, UsageRecord
from attribution.wire import (
    REQUEST_HEADER,
    SIGNATURE_HEADER,
    Receipt,
    canonical_body,
    prompt_hash,
    request_headers,
    response_hash,
)

PAYER_KEY = "0x" + "11" * 32
SIGNER_KEY = "0x" + "12" * 32  # a key the payer authorised
NODE_KEY = "0x" + "22" * 32
OTHER_KEY = "0x" + "33" * 32
DOMAIN = Domain(31337, to_checksum_address("0x" + "ab" * 20))
INFO = NodeInfo(DOMAIN, address_of(NODE_KEY), address_of(NODE_KEY), max_request_ttl=300, max_commit_delay=600)
UINT32_MAX = (1 << 32) - 1


def chat(content: str = "What is the capital of France?", **options) -> dict:
    return build_chat_body("m", [{"role": "user", "content": content}], max_tokens=16, **options)  # maxTokens 16


def signed_for(body: dict, key: str = PAYER_KEY, **fields):
    values = dict(payer=address_of(PAYER_KEY), adapter_id=7, input_tokens=12, max_charge=500, cumulative_cap=1500,
                  deadline=1_900_000_000) | fields  # fmt: skip
    return sign_body(body, key, info=INFO, **values)


# -- bodies ----------------------------------------------------------------------------------------------


def test_chat_body_is_exactly_what_is_given():
    body = build_chat_body("m", [{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.5, seed=None)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                    "temperature": 0.5}  # fmt: skip
    assert build_chat_body("m", [{"role": "user", "content": "Hi"}], max_tokens=5, stream=True)["stream"] is True


def test_completion_body_takes_text_or_token_ids():
    assert build_completion_body("m", "Once", max_tokens=3) == {"model": "m", "prompt": "Once", "max_tokens": 3}
    assert build_completion_body("m", (5, 6), max_tokens=3)["prompt"] == [5, 6]


@pytest.mark.parametrize("max_tokens", [0, -1, UINT32_MAX + 1, True, 2.0, "8"])
def test_max_tokens_out_of_range_is_refused(max_tokens):
    with pytest.raises(RequestBuildError, match="max_tokens"):
        build_chat_body("m", [{"role": "user", "content": "Hi"}], max_tokens=max_tokens)


@pytest.mark.parametrize("max_tokens", [1, UINT32_MAX])
def test_max_tokens_at_the_bounds_is_taken(max_tokens):
    assert build_completion_body("m", "x", max_tokens=max_tokens)["max_tokens"] == max_tokens


def test_fields_the_client_owns_cannot_be_options():
    with pytest.raises(RequestBuildError, match="max_completion_tokens, prompt cannot be given"):
        build_chat_body("m", [{"role": "user", "content": "Hi"}], max_tokens=5, max_completion_tokens=3, prompt="x")
    with pytest.raises(RequestBuildError, match="messages cannot be given"):
        build_completion_body("m", "x", max_tokens=5, messages=[])
    with pytest.raises(RequestBuildError, match="at least one message"):
        build_chat_body("m", [], max_tokens=5)


# -- prompt hash and headers --------------------------------------------------------------------------


def test_prompt_hash_is_keccak_of_the_rfc8785_form():
    body = {"model": "m", "max_tokens": 2, "prompt": "é 🙂", "temperature": 1.0, "stop": ["\n"]}
    # RFC 8785 by hand: keys sorted, no whitespace, 1.0 -> 1, non-ASCII as UTF-8, control characters escaped
    canonical = '{"max_tokens":2,"model":"m","prompt":"é 🙂","stop":["\\n"],"temperature":1}'
    assert canonical_body(body) == canonical.encode()
    # its keccak256 by viem (noble-hashes), independent of the eth-hash / pycryptodome the client uses
    assert prompt_hash(body).hex() == "eee085cb474100d4475f14412340df7798d91e40f55f90e76b5ee0b0fea8cb08"
    reordered = json.loads(json.dumps(dict(reversed(body.items())), indent=3))
    assert prompt_hash(reordered) == prompt_hash(body)
    assert prompt_hash(body | {"prompt": "é 🙂!"}) != prompt_hash(body)


@pytest.mark.parametrize("value", [2**53, -(2**53), float("nan"), float("inf")])
def test_bodies_json_cannot_carry_exactly_are_refused(value):
    with pytest.raises(RequestBuildError, match="RFC 8785"):
        prompt_hash(chat(seed=value))
    assert prompt_hash(chat(seed=2**53 - 1))  # the largest integer every JSON reader keeps exactly


def test_response_hash_is_keccak_of_the_utf8_text():
    assert response_hash("Paris 🙂").hex() == "9417552d89a89d8d1df6fb0e3cd11d369752a9aaf930b3975c4853bc1ea7e159"  # viem


def test_headers_carry_the_signed_request_in_wire_form():
    signed = signed_for(chat())
    headers = request_headers(signed.request, signed.signature)
    wire = json.loads(headers[REQUEST_HEADER])
    assert " " not in headers[REQUEST_HEADER] and all(isinstance(v, str) for v in wire.values())
    assert wire["maxCharge"] == "500" and wire["promptHash"] == "0x" + prompt_hash(chat()).hex()
    assert InferenceRequest.from_wire(wire) == signed.request
    raw = bytes.fromhex(headers[SIGNATURE_HEADER].removeprefix("0x"))
    assert len(raw) == 65 and raw[64] in (27, 28) and int.from_bytes(raw[32:64], "big") <= SECP256K1_N // 2
    assert recover(signed.request.digest(DOMAIN), Signature.from_bytes(raw)) == address_of(PAYER_KEY)


def test_an_authorised_signer_signs_for_the_payer():
    signed = signed_for(chat(), key=SIGNER_KEY)
    assert signed.request.payer == address_of(PAYER_KEY)
    assert recover(signed.request.digest(DOMAIN), signed.signature) == address_of(SIGNER_KEY)


def test_sign_body_binds_the_body_caps_and_node():
    body = chat()
    request = signed_for(body).request
    assert (request.node, request.max_tokens, request.interval) == (INFO.node, 16, (1000, 1500))
    assert request.prompt_hash == prompt_hash(body)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"max_charge": 0, "cumulative_cap": 0}, "empty interval"),
        ({"max_charge": 10, "cumulative_cap": 9}, "empty interval"),
        ({"input_tokens": UINT32_MAX + 1}, "uint32"),
        ({"cumulative_cap": 1 << 128}, "uint128"),
    ],
)
def test_sign_body_refuses_fields_that_do_not_fit(fields, match):
    with pytest.raises(RequestBuildError, match=match):
        signed_for(chat(), **fields)
    signed_for(chat(), max_charge=10, cumulative_cap=10)  # the smallest well-formed interval


def test_the_sent_body_must_be_the_signed_body():
    signed = signed_for(chat())
    ok = httpx2.Request("POST", "http://node/v1/chat/completions", json=signed.body, headers=signed.headers)
    asyncio.run(check_sent_body(ok))
    changed = httpx2.Request("POST", "http://node/v1/chat/completions", json=chat("Other"), headers=signed.headers)
    with pytest.raises(RequestBuildError, match="changed the request body"):
        asyncio.run(check_sent_body(changed))


# -- maxCharge ------------------------------------------------------------------------------------------


def test_max_charge_is_prices_and_fee_times_the_caps():
    terms = ModelTerms("a", adapter_id=7, price_in=3, price_out=5)
    assert max_charge_for(terms, input_tokens=10, max_tokens=20, node_fee_per_token=2) == 5 * 10 + 7 * 20
    assert max_charge_for(terms, input_tokens=10, max_tokens=20) == 3 * 10 + 5 * 20


def test_the_base_model_pays_the_node_fee_only_and_at_least_one_wei():
    base = ModelTerms("base", adapter_id=0, price_in=None, price_out=None)
    assert max_charge_for(base, 10, 20, node_fee_per_token=2) == 60
    assert max_charge_for(base, 10, 20) == 1  # free, but a request still authorises a non-empty interval


def test_an_adapter_without_prices_needs_an_explicit_max_charge():
    with pytest.raises(RequestBuildError, match="no prices"):
        max_charge_for(ModelTerms("a", 7, None, 5), 1, 1)


# -- what the node publishes -----------------------------------------------------------------------------


def test_node_info_parses_decimal_strings():
    info = NodeInfo.from_json({"chainId": "31337", "settlement": DOMAIN.verifying_contract.lower(), "node": INFO.node,
                               "signer": INFO.signer, "maxRequestTtl": "300", "maxCommitDelay": 600})  # fmt: skip
    assert info == INFO
    assert NodeInfo.from_json(INFO_JSON | {"nodeFeePerToken": "7"}).node_fee_per_token == 7


INFO_JSON = {"chainId": "31337", "settlement": DOMAIN.verifying_contract, "node": INFO.node, "signer": INFO.signer,
             "maxRequestTtl": "300", "maxCommitDelay": "600"}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [{"chainId": "-1"}, {"chainId": "0x7a69"}, {"settlement": "0x12"}, {"signer": None}, {"maxRequestTtl": 1.5}],
)
def test_node_info_refuses_malformed_fields(change):
    with pytest.raises(NodeUnavailableError, match="GET /v1/attribution: field"):
        NodeInfo.from_json(INFO_JSON | change)


def test_model_terms_need_an_adapter_id():
    assert ModelTerms.from_json({"id": "a", "adapterId": "7", "priceIn": "3", "priceOut": 5}) == ModelTerms(
        "a", 7, 3, 5
    )
    assert ModelTerms.from_json({"id": "b", "adapterId": 0}) == ModelTerms("b", 0, None, None)
    with pytest.raises(NodeUnavailableError, match="not chain-backed"):
        ModelTerms.from_json({"id": "c", "object": "model"})


# -- receipts and their verification --------------------------------------------------------------------

TEXT = "La capitale de la France est Paris, évidemment."


def receipt_for(signed, text: str = TEXT, key: str = NODE_KEY, **record_fields) -> Receipt:
    """What an honest node returns (record signed with `key`), with `record_fields` changed before signing."""
    request = signed.request
    record = UsageRecord(request.digest(DOMAIN), 0, 9, 0, 42, response_hash(text), 1_899_999_990)
    record = dataclasses.replace(record, **record_fields)
    return Receipt(request, signed.signature, record, sign_usage_record(record, DOMAIN, key), INFO.node, INFO.signer)


def test_an_honest_receipt_verifies_and_round_trips_through_json():
    signed = signed_for(chat())
    receipt = receipt_for(signed)
    verify_receipt(receipt, signed, TEXT, INFO.signer)
    assert Receipt.from_json(json.loads(json.dumps(receipt.to_json()))) == receipt


def test_the_caps_are_inclusive():
    signed = signed_for(chat())
    verify_receipt(receipt_for(signed, output_tokens=16, charge=500), signed, TEXT, INFO.signer)  # = the caps


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda s: receipt_for(s, key=OTHER_KEY), "not by the node's signer"),
        (lambda s: receipt_for(s, request_digest=b"\x01" * 32), "requestDigest"),
        (lambda s: receipt_for(signed_for(chat("Another prompt"))), "not the request we signed"),
        (lambda s: receipt_for(s, output_tokens=17), "over maxTokens 16"),
        (lambda s: receipt_for(s, charge=501), "over maxCharge 500"),
        (lambda s: receipt_for(s, text=TEXT + " "), "responseHash"),
        (lambda s: receipt_for(s, response_hash=keccak(TEXT.encode("latin-1"))), "responseHash"),
        (lambda s: dataclasses.replace(receipt_for(s), signer=address_of(OTHER_KEY)), "names signer"),
        (lambda s: dataclasses.replace(receipt_for(s), node=address_of(OTHER_KEY)), "names node"),
        (lambda s: dataclasses.replace(receipt_for(s), signature=high_s(receipt_for(s).signature)), "high-s"),
    ],
    ids=[
        "wrong signer",
        "wrong digest",
        "other request",
        "tokens over",
        "charge over",
        "text changed",
        "text re-encoded",
        "receipt signer",
        "receipt node",
        "high-s",
    ],  # fmt: skip
)
def test_verification_refuses(tamper, match):
    signed = signed_for(chat())
    with pytest.raises(RecordError, match=match):
        verify_receipt(tamper(signed), signed, TEXT, INFO.signer)


def high_s(signature: Signature) -> Signature:
    """The other valid signature of the same digest (s -> n - s, v flipped): malleable, refused."""
    s = SECP256K1_N - int.from_bytes(signature.s, "big")
    return Signature(55 - signature.v, signature.r, s.to_bytes(32, "big"))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"record": None}, "'record'"),
        ({"requestSignature": "0x1234"}, "'requestSignature': a signature is 65 bytes"),
        ({"signature": "0x" + "00" * 64}, "compact"),
        ({"node": "nobody"}, "'node'"),
        ({"extra": 1, "request": {"payer": "0x"}}, "'request': missing fields"),
    ],
)
def test_malformed_receipts_are_refused(change, match):
    data = receipt_for(signed_for(chat())).to_json() | change
    with pytest.raises(RecordError, match=match):
        Receipt.from_json(data)
    with pytest.raises(RecordError, match="not a JSON object"):
        Receipt.from_json([data])
