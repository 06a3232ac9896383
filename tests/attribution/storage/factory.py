"""Signed usage entries for the journal tests (real EIP-712 digests and secp256k1 signatures), made
deterministically from an index so that a test, or a crashed child process, can rebuild any of them."""

from __future__ import annotations

from eth_hash.auto import keccak

from attribution.signing import address_of, sign_request, sign_usage_record
from attribution.storage import Usage
from attribution.types import Domain, InferenceRequest, UsageRecord

DOMAIN = Domain(31337, "0x" + "33" * 20)
PAYER_KEYS = (b"\x01" * 32, b"\x02" * 32)
PAYERS = tuple(address_of(k) for k in PAYER_KEYS)
NODE_KEY = b"\x09" * 32
NODE = address_of(NODE_KEY)
NOW = 1_800_000_000
MAX_CHARGE = 1_000


def paid(
    i: int, *, payer: int = 0, charge: int = 600, deadline: int = NOW + 60, max_charge: int = MAX_CHARGE,
    cumulative_cap: int | None = None,
) -> Usage:  # fmt: skip
    """Request `i` of payer `payer`: by default its interval is the i-th slice of MAX_CHARGE."""
    request = InferenceRequest(
        payer=PAYERS[payer], node=NODE, adapter_id=1 + i % 3, prompt_hash=keccak(b"prompt %d" % i),
        input_tokens=10 + i % 7, max_tokens=64, max_charge=max_charge,
        cumulative_cap=max_charge * (i + 1) if cumulative_cap is None else cumulative_cap, deadline=deadline,
    )  # fmt: skip
    record = UsageRecord(
        request_digest=request.digest(DOMAIN), terms_version=1, output_tokens=20 + i % 5,
        adapter_amount=charge // 2, charge=charge, response_hash=keccak(b"answer %d" % i), served_at=NOW,
    )  # fmt: skip
    return Usage(
        request, sign_request(request, DOMAIN, PAYER_KEYS[payer]), record,
        sign_usage_record(record, DOMAIN, NODE_KEY), adapter=f"adapter-{i % 3}",
    )  # fmt: skip


def free(i: int) -> Usage:
    """An unsigned request served free: charge 0, a node-chosen digest, the node's signature only."""
    record = UsageRecord(
        request_digest=keccak(b"free %d" % i), terms_version=0, output_tokens=7, adapter_amount=0, charge=0,
        response_hash=keccak(b"free answer %d" % i), served_at=NOW,
    )  # fmt: skip
    return Usage(None, None, record, sign_usage_record(record, DOMAIN, NODE_KEY), adapter="")
