"""The v2 EIP-712 types against an independent encoder (eth-account's generic typed-data path), their
wire form, and signature parsing. The contract-side digest equality lives beside the contracts' tests."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.errors import SignatureError
from attribution.signing import address_of, recover, sign_request, sign_usage_record
from attribution.types import (
    SECP256K1_N,
    Domain,
    InferenceRequest,
    Signature,
    UsageRecord,
    intervals_overlap,
    typed_data,
)

addresses = st.binary(min_size=20, max_size=20).map(to_checksum_address)
uint = lambda bits: st.integers(min_value=0, max_value=(1 << bits) - 1)  # noqa: E731
bytes32 = st.binary(min_size=32, max_size=32)
requests = st.builds(
    InferenceRequest, addresses, addresses, uint(64), bytes32, uint(32), uint(32), uint(128), uint(128), uint(64)
)
records = st.builds(UsageRecord, bytes32, uint(32), uint(32), uint(128), uint(128), bytes32, uint(64))
keys = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda k: k.to_bytes(32, "big"))
domains = st.builds(Domain, uint(64), addresses)


@settings(max_examples=40, deadline=None)
@given(domain=domains, message=st.one_of(requests, records), key=keys)
def test_digest_and_signature_equal_eth_accounts(domain: Domain, message, key: bytes) -> None:
    reference = encode_typed_data(full_message=typed_data(domain, message))
    signed = Account.sign_message(reference, key)
    ours = (
        sign_request(message, domain, key)
        if isinstance(message, InferenceRequest)
        else sign_usage_record(message, domain, key)
    )
    assert message.digest(domain) == bytes(signed.message_hash)
    assert recover(message.digest(domain), ours) == address_of(key) == Account.from_key(key).address
    assert ours.to_bytes() == bytes(signed.signature)


@settings(max_examples=40, deadline=None)
@given(message=st.one_of(requests, records))
def test_wire_form_round_trips(message) -> None:
    wire = message.to_wire()
    assert all(isinstance(v, str) for v in wire.values())
    assert type(message).from_wire(wire) == message


def _request(**changes) -> InferenceRequest:
    base = dict(
        payer="0x" + "11" * 20,
        node="0x" + "22" * 20,
        adapter_id=3,
        prompt_hash=b"\1" * 32,
        input_tokens=10,
        max_tokens=64,
        max_charge=1000,
        cumulative_cap=5000,
        deadline=1_800_000_000,
    )
    base.update(changes)
    return InferenceRequest(**base)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("maxCharge", 1000, "expected a string"),
        ("maxCharge", "-1", "decimal integer"),
        ("maxCharge", "01", "leading zeros"),
        ("maxCharge", str(1 << 128), "does not fit uint128"),
        ("inputTokens", str(1 << 32), "does not fit uint32"),
        ("payer", "0x1234", "20-byte"),
        ("promptHash", "0x" + "zz" * 32, "not hex"),
        ("promptHash", "0x" + "00" * 31, "64 hex digits"),
    ],
)
def test_wire_form_rejects_bad_fields(field: str, value, reason: str) -> None:
    wire = _request().to_wire()
    wire[field] = value
    with pytest.raises(ValueError, match=field) as info:
        InferenceRequest.from_wire(wire)
    assert reason in str(info.value)


def test_wire_form_rejects_missing_and_unknown_fields() -> None:
    wire = _request().to_wire()
    del wire["deadline"]
    with pytest.raises(ValueError, match="missing fields"):
        InferenceRequest.from_wire(wire)
    with pytest.raises(ValueError, match="unknown fields"):
        InferenceRequest.from_wire({**_request().to_wire(), "nonce": "1"})
    with pytest.raises(ValueError, match="JSON object"):
        InferenceRequest.from_wire(["not", "a", "dict"])


def test_interval_and_well_formedness_boundaries() -> None:
    assert _request(max_charge=1000, cumulative_cap=1000).well_formed  # limit: starts at zero
    assert not _request(max_charge=1000, cumulative_cap=999).well_formed  # limit - 1: would start below zero
    assert _request(max_charge=1000, cumulative_cap=1001).well_formed
    assert not _request(max_charge=0, cumulative_cap=5).well_formed  # an empty interval authorises nothing
    assert _request().interval == (4000, 5000)
    assert intervals_overlap((4000, 5000), (4999, 6000))
    assert not intervals_overlap((4000, 5000), (5000, 6000))  # adjacent intervals do not overlap
    assert not intervals_overlap((4000, 5000), (3000, 4000))
    assert intervals_overlap((4000, 5000), (4000, 5000))


def test_signature_parsing_refuses_compact_high_s_and_junk() -> None:
    key = b"\x07" * 32
    request = _request(payer=address_of(key))
    domain = Domain(31337, "0x" + "33" * 20)
    good = sign_request(request, domain, key)
    assert Signature.from_hex(good.to_hex()) == good
    with pytest.raises(SignatureError, match="EIP-2098"):
        Signature.from_bytes(good.to_bytes()[:64])
    with pytest.raises(SignatureError, match="65 bytes"):
        Signature.from_bytes(good.to_bytes() + b"\0")
    with pytest.raises(SignatureError, match="130 hex"):
        Signature.from_hex(good.to_bytes().hex())
    flipped = Signature(55 - good.v, good.r, (SECP256K1_N - int.from_bytes(good.s, "big")).to_bytes(32, "big"))
    with pytest.raises(SignatureError, match="high-s"):
        recover(request.digest(domain), flipped)
    other_chain = Domain(1, domain.verifying_contract)
    assert recover(request.digest(other_chain), good) != address_of(key)
