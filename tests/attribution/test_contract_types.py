"""The EIP-712 schema has one source of truth (`attribution.types`): the contracts spell the same type
strings, hash random structs exactly like Python, recover Python's signatures, and reject high-s ones."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from attribution import types
from attribution.chain import Chain, UsageSettlementClient
from attribution.errors import ContractRevert, SignatureError
from attribution.signing import address_of, recover, sign_request
from attribution.types import SECP256K1_N, Domain, InferenceRequest, Signature, UsageRecord
from tests.attribution.test_types import keys, records, requests  # one set of strategies for both

SOURCE = Path(__file__).resolve().parents[2] / "contracts" / "src" / "UsageTypes.sol"


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
