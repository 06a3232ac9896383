"""Each check of a signed request at its boundaries (limit - 1, limit, limit + 1), with the status and code
the API answers and whether the refusal is retryable."""

from __future__ import annotations

import dataclasses
import json

import pytest
import rfc8785
from eth_hash.auto import keccak

from attribution import checks
from attribution.checks import RequestRefused, SignerStatus, Terms
from attribution.signing import address_of, sign_request
from attribution.types import SECP256K1_N, Domain, InferenceRequest, Signature
from attribution.wire import prompt_hash

PAYER_KEY = b"\x01" * 32
SIGNER_KEY = b"\x02" * 32
NODE = "0x" + "22" * 20
DOMAIN = Domain(31337, "0x" + "33" * 20)
NOW = 1_800_000_000
BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}).encode()


def make(**changes) -> InferenceRequest:
    fields = dict(
        payer=address_of(PAYER_KEY), node=NODE, adapter_id=3, prompt_hash=prompt_hash(json.loads(BODY)), input_tokens=10,
        max_tokens=20, max_charge=1_000, cumulative_cap=5_000, deadline=NOW + 60,
    )  # fmt: skip
    fields.update(changes)
    return InferenceRequest(**fields)


def refused(call, *args) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        call(*args)
    return info.value


def test_signature_recovers_payer_and_refuses_tampering_and_high_s() -> None:
    request = make()
    good = sign_request(request, DOMAIN, PAYER_KEY)
    assert checks.check_signature(request, good, DOMAIN) == request.payer
    # Any changed field or another chain recovers someone else: the signer check then refuses.
    assert checks.check_signature(dataclasses.replace(request, max_charge=1_001), good, DOMAIN) != request.payer
    assert checks.check_signature(request, good, Domain(1, DOMAIN.verifying_contract)) != request.payer
    high_s = Signature(55 - good.v, good.r, (SECP256K1_N - int.from_bytes(good.s, "big")).to_bytes(32, "big"))
    error = refused(checks.check_signature, request, high_s, DOMAIN)
    assert (error.status, error.code, error.retryable) == (401, "invalid_signature", False)
    assert "high-s" in error.message


def test_signer_rules() -> None:
    request = make()
    signer = address_of(SIGNER_KEY)
    checks.check_signer(request, request.payer, None, NOW, 600)  # the payer itself needs no authorisation
    assert refused(checks.check_signer, request, signer, None, NOW, 600).code == "signer_not_authorized"
    # authorised_at: limit - 1 refused, limit accepted.
    assert (
        refused(checks.check_signer, request, signer, SignerStatus(NOW + 1), NOW, 600).code == "signer_not_authorized"
    )
    checks.check_signer(request, signer, SignerStatus(NOW), NOW, 600)
    # Revocation must be at least `margin` away: now + margin accepted, one second less refused.
    checks.check_signer(request, signer, SignerStatus(NOW - 10, NOW + 600), NOW, 600)
    assert (
        refused(checks.check_signer, request, signer, SignerStatus(NOW - 10, NOW + 599), NOW, 600).code
        == "signer_revoked"
    )
    assert (
        refused(checks.check_signer, request, signer, SignerStatus(NOW - 10, NOW), NOW, 600).code
        == "signer_not_authorized"
    )


def test_node() -> None:
    checks.check_node(make(), NODE.upper().replace("0X", "0x"))
    error = refused(checks.check_node, make(node="0x" + "44" * 20), NODE)
    assert (error.status, error.code) == (403, "wrong_node")


@pytest.mark.parametrize(
    ("deadline", "code"),
    [(NOW - 1, "request_expired"), (NOW, None), (NOW + 300, None), (NOW + 301, "deadline_too_far")],
)
def test_deadline_boundaries(deadline: int, code: str | None) -> None:
    if code is None:
        checks.check_deadline(make(deadline=deadline), NOW, 300)
    else:
        assert refused(checks.check_deadline, make(deadline=deadline), NOW, 300).code == code


@pytest.mark.parametrize(
    ("max_charge", "cap", "ok"),
    [(1, 0, False), (1, 1, True), (0, 0, False), (0, 5, False), (5, 4, False), (5, 5, True)],
)
def test_interval_boundaries(max_charge: int, cap: int, ok: bool) -> None:
    request = make(max_charge=max_charge, cumulative_cap=cap)
    if ok:
        checks.check_interval(request)
    else:
        assert refused(checks.check_interval, request).code == "invalid_interval"


def test_prompt_hash_is_over_canonical_json() -> None:
    reordered = json.dumps(json.loads(BODY), indent=2, sort_keys=True).encode()
    checks.check_prompt_hash(make(), reordered)  # key order and whitespace do not matter
    assert prompt_hash(json.loads(BODY)) == keccak(rfc8785.dumps(json.loads(BODY)))
    changed = BODY.replace(b'"hi"', b'"hi!"')
    error = refused(checks.check_prompt_hash, make(), changed)
    assert (error.status, error.code) == (422, "prompt_hash_mismatch")


def test_adapter_and_input_tokens() -> None:
    checks.check_adapter(make(adapter_id=3), 3, "demo")
    assert refused(checks.check_adapter, make(adapter_id=3), 4, "demo").code == "adapter_mismatch"
    # The message names the model as the client sent it, and the CID that name resolved to.
    message = refused(checks.check_adapter, make(adapter_id=3), 4, "sql-expert", "bafy-sql").message
    assert "'sql-expert' (CID bafy-sql) is adapter id 4" in message
    assert "'tiny' is adapter id 0" in refused(checks.check_adapter, make(adapter_id=3), 0, "tiny").message
    checks.check_input_tokens(make(input_tokens=10), 10)
    for counted in (9, 11):
        error = refused(checks.check_input_tokens, make(input_tokens=10), counted)
        assert (error.status, error.code) == (422, "input_tokens_mismatch")


def test_price_boundary() -> None:
    terms = Terms(terms_version=2, price_in=3, price_out=5, fee_per_token=1)
    most = 10 * 3 + 20 * 5 + 1 * 30  # input 10, maxTokens 20
    assert terms.charge(10, 20) == (130, most)
    checks.check_price(make(max_charge=most), terms)
    checks.check_price(make(max_charge=most + 1), terms)
    error = refused(checks.check_price, make(max_charge=most - 1), terms)
    assert (error.status, error.code, error.retryable) == (402, "max_charge_too_low", False)


def test_escrow_boundary_is_retryable() -> None:
    checks.check_escrow(make(max_charge=1_000), 1_500, 500)
    error = refused(checks.check_escrow, make(max_charge=1_000), 1_499, 500)
    assert (error.status, error.code, error.retryable) == (402, "insufficient_escrow", True)
    checks.check_escrow(make(max_charge=1_000), 1_501, 500)
