"""The EIP-712 schema has one source of truth (`attribution.types`): the contracts spell the same type
strings, hash random structs exactly like Python, recover Python's signatures, and reject high-s ones."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from eth_utils import to_checksum_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attribution import types
from attribution.chain import Chain, UsageSettlementClient
from attribution.errors import ContractRevert, SignatureError
from attribution.signing import address_of, recover, sign_request
from attribution.types import SECP256K1_N, Domain, InferenceRequest, Signature, UsageRecord

SOURCE = Path(__file__).resolve().parents[2] / "contracts" / "src" / "UsageTypes.sol"

addresses = st.binary(min_size=20, max_size=20).map(to_checksum_address)
uint = lambda bits: st.integers(min_value=0, max_value=(1 << bits) - 1)  # noqa: E731
bytes32 = st.binary(min_size=32, max_size=32)
requests = st.builds(
    InferenceRequest, addresses, addresses, uint(64), bytes32, uint(32), uint(32), uint(128), uint(128), uint(64)
)
records = st.builds(UsageRecord, bytes32, uint(32), uint(32), uint(128), uint(128), bytes32, uint(64))
keys = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda k: k.to_bytes(32, "big"))


def test_type_strings_match_the_solidity_source() -> None:
    literals = re.findall(r'"((?:InferenceRequest|UsageRecord)\([^"]*\))"', SOURCE.read_text())
    assert literals == [types.REQUEST_TYPE, types.RECORD_TYPE]


@pytest.fixture
def settlement(anvil, fresh_chain):
    """(runner, settlement client) on a private event loop, for hypothesis tests (which are sync)."""
    with asyncio.Runner() as runner:
        chain = runner.run(Chain.connect(anvil.rpc_url))
        yield runner, UsageSettlementClient(chain, fresh_chain.contracts["UsageSettlement"])
        runner.run(chain.close())


def test_domain_is_version_2(settlement) -> None:
    runner, s = settlement
    domain = runner.run(s.contract.functions.eip712Domain().call())
    assert (domain[1], domain[2], domain[3], domain[4]) == ("OpenLoRA", "2", s.chain.chain_id, s.address)
    assert types.DOMAIN_VERSION == "2"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, record=records, key=keys)
def test_contract_digests_equal_python(settlement, request: InferenceRequest, record: UsageRecord, key: bytes) -> None:
    runner, s = settlement
    domain = Domain(s.chain.chain_id, s.address)
    assert runner.run(s._call("hashRequest", request.as_tuple())) == request.struct_hash()
    assert runner.run(s._call("requestDigest", request.as_tuple())) == request.digest(domain)
    assert runner.run(s._call("hashUsageRecord", record.as_tuple())) == record.struct_hash()
    assert runner.run(s._call("usageRecordDigest", record.as_tuple())) == record.digest(domain)
    signature = sign_request(request, domain, key)
    assert signature.is_low_s
    signer = runner.run(s._call("recoverRequestSigner", request.as_tuple(), signature.v, signature.r, signature.s))
    assert signer == address_of(key) == recover(request.digest(domain), signature)


def test_high_s_rejected_on_chain_and_in_python(settlement) -> None:
    runner, s = settlement
    domain = Domain(s.chain.chain_id, s.address)
    key = b"\x07" * 32
    request = InferenceRequest(address_of(key), address_of(key), 1, bytes(32), 1, 1, 1, 1, 1)
    good = sign_request(request, domain, key)
    flipped = Signature(55 - good.v, good.r, (SECP256K1_N - int.from_bytes(good.s, "big")).to_bytes(32, "big"))
    assert not flipped.is_low_s
    with pytest.raises(ContractRevert) as info:
        runner.run(s._call("recoverRequestSigner", request.as_tuple(), flipped.v, flipped.r, flipped.s))
    assert info.value.error == "ECDSAInvalidSignatureS"
    with pytest.raises(SignatureError):
        recover(request.digest(domain), flipped)
