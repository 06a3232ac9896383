"""EIP-712 types of OpenLoRA: the single source of truth for `InferenceRequest` and `UsageRecord`.

Both types are signed under the domain {name "OpenLoRA", version "1", chainId, verifyingContract: the
UsageSettlement contract}. The Solidity side (`contracts/src/UsageTypes.sol`) spells the same type strings;
`tests/attribution/test_eip712.py` proves the contract hashes random structs exactly as this module does.

Field order (it is part of the signed type, never reorder):

    InferenceRequest(address payer,address node,uint64 adapterId,bytes32 promptHash,uint32 maxTokens,
                     uint128 maxCharge,uint64 nonce,uint64 deadline)
        signed by the payer or a signer it authorised in the PaymentEscrow. `node` and `promptHash` bind
        the request to one node and one prompt; `maxTokens` caps the output tokens, `maxCharge` the charge
        (OPEN wei); `nonce` is random, unique per (payer, node); `deadline` is a unix time.

    UsageRecord(bytes32 requestDigest,uint32 termsVersion,uint32 inputTokens,uint32 outputTokens,
                uint128 adapterAmount,uint128 charge,bytes32 responseHash,uint64 servedAt)
        signed by the node. `requestDigest` is the request's EIP-712 digest (payer and adapter are read
        from the request); `termsVersion` is the adapter terms version in force at `servedAt`;
        `adapterAmount = priceIn * inputTokens + priceOut * outputTokens` at that version and
        `charge = adapterAmount + nodeFeePerToken * (inputTokens + outputTokens)`.

Signing is the raw secp256k1 signature of the digest made with coincurve (about 0.05 ms, against
~8.5 ms for eth-account's generic typed-data path); libsecp256k1 always produces low-s signatures, and
`recover` rejects high-s ones like OpenZeppelin's ECDSA does. Deduplicate requests on their digest
(`request_digest`), never on signature bytes.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

import coincurve
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from attribution.errors import SignatureError

DOMAIN_NAME = "OpenLoRA"
DOMAIN_VERSION = "1"

# secp256k1 group order; a signature is canonical ("low-s") when s <= N // 2.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

REQUEST_FIELDS: tuple[tuple[str, str], ...] = (
    ("payer", "address"),
    ("node", "address"),
    ("adapterId", "uint64"),
    ("promptHash", "bytes32"),
    ("maxTokens", "uint32"),
    ("maxCharge", "uint128"),
    ("nonce", "uint64"),
    ("deadline", "uint64"),
)
RECORD_FIELDS: tuple[tuple[str, str], ...] = (
    ("requestDigest", "bytes32"),
    ("termsVersion", "uint32"),
    ("inputTokens", "uint32"),
    ("outputTokens", "uint32"),
    ("adapterAmount", "uint128"),
    ("charge", "uint128"),
    ("responseHash", "bytes32"),
    ("servedAt", "uint64"),
)
DOMAIN_FIELDS: tuple[tuple[str, str], ...] = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
)


def type_string(name: str, fields: tuple[tuple[str, str], ...]) -> str:
    """EIP-712 `encodeType` of a struct with only atomic members."""
    return f"{name}(" + ",".join(f"{t} {n}" for n, t in fields) + ")"


REQUEST_TYPE = type_string("InferenceRequest", REQUEST_FIELDS)
RECORD_TYPE = type_string("UsageRecord", RECORD_FIELDS)
DOMAIN_TYPE = type_string("EIP712Domain", DOMAIN_FIELDS)
REQUEST_TYPEHASH = keccak(REQUEST_TYPE.encode())
RECORD_TYPEHASH = keccak(RECORD_TYPE.encode())
DOMAIN_TYPEHASH = keccak(DOMAIN_TYPE.encode())


def encode_word(abi_type: str, value: Any) -> bytes:
    """ABI-encodes one atomic value as a 32-byte word (the EIP-712 `encodeData` of atomic types)."""
    if abi_type == "address":
        raw = bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)
        if len(raw) != 20:
            raise ValueError(f"address must be 20 bytes, got {len(raw)}")
        return raw.rjust(32, b"\0")
    if abi_type == "bytes32":
        raw = bytes(value)
        if len(raw) != 32:
            raise ValueError(f"bytes32 must be 32 bytes, got {len(raw)}")
        return raw
    if abi_type.startswith("uint"):
        bits = int(abi_type[4:])
        if not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise ValueError(f"{value!r} does not fit {abi_type}")
        return value.to_bytes(32, "big")
    raise ValueError(f"unsupported atomic type {abi_type}")


def encode_words(fields: tuple[tuple[str, str], ...], values: tuple[Any, ...]) -> bytes:
    return b"".join(encode_word(t, v) for (_, t), v in zip(fields, values, strict=True))


@dataclass(frozen=True, slots=True)
class Domain:
    """The EIP-712 domain: fixed name and version, the chain and the UsageSettlement address."""

    chain_id: int
    verifying_contract: str

    def separator(self) -> bytes:
        return keccak(
            DOMAIN_TYPEHASH
            + keccak(DOMAIN_NAME.encode())
            + keccak(DOMAIN_VERSION.encode())
            + encode_word("uint256", self.chain_id)
            + encode_word("address", self.verifying_contract)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """What a payer signs to buy one inference. Field order = `REQUEST_FIELDS`."""

    payer: str
    node: str
    adapter_id: int
    prompt_hash: bytes
    max_tokens: int
    max_charge: int
    nonce: int
    deadline: int

    def as_tuple(self) -> tuple[Any, ...]:
        """Values in field order (also the contract ABI tuple)."""
        return astuple(self)

    def struct_hash(self) -> bytes:
        return keccak(REQUEST_TYPEHASH + encode_words(REQUEST_FIELDS, self.as_tuple()))

    def digest(self, domain: Domain) -> bytes:
        return typed_digest(domain, self.struct_hash())

    def message(self) -> dict[str, Any]:
        return dict(zip((n for n, _ in REQUEST_FIELDS), self.as_tuple(), strict=True))


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What a node signs for each answer. Field order = `RECORD_FIELDS`."""

    request_digest: bytes
    terms_version: int
    input_tokens: int
    output_tokens: int
    adapter_amount: int
    charge: int
    response_hash: bytes
    served_at: int

    def as_tuple(self) -> tuple[Any, ...]:
        return astuple(self)

    def struct_hash(self) -> bytes:
        return keccak(RECORD_TYPEHASH + encode_words(RECORD_FIELDS, self.as_tuple()))

    def digest(self, domain: Domain) -> bytes:
        return typed_digest(domain, self.struct_hash())

    def message(self) -> dict[str, Any]:
        return dict(zip((n for n, _ in RECORD_FIELDS), self.as_tuple(), strict=True))


@dataclass(frozen=True, slots=True)
class Signature:
    """A secp256k1 signature as the contracts take it: v in {27, 28}, r and s as 32 bytes each."""

    v: int
    r: bytes
    s: bytes

    def to_bytes(self) -> bytes:
        """65 bytes r || s || v (the usual wire form)."""
        return self.r + self.s + bytes([self.v])

    @classmethod
    def from_bytes(cls, raw: bytes) -> Signature:
        if len(raw) != 65:
            raise SignatureError(f"a signature is 65 bytes, got {len(raw)}")
        v = raw[64] if raw[64] >= 27 else raw[64] + 27
        return cls(v=v, r=raw[:32], s=raw[32:64])

    @property
    def is_low_s(self) -> bool:
        return int.from_bytes(self.s, "big") <= SECP256K1_N // 2


def typed_digest(domain: Domain, struct_hash: bytes) -> bytes:
    """keccak256("\\x19\\x01" || domainSeparator || structHash)."""
    return keccak(b"\x19\x01" + domain.separator() + struct_hash)


def _key_bytes(private_key: bytes | str) -> bytes:
    if isinstance(private_key, str):
        private_key = bytes.fromhex(private_key.removeprefix("0x"))
    if len(private_key) != 32:
        raise SignatureError("a private key is 32 bytes")
    return private_key


def sign_digest(digest: bytes, private_key: bytes | str) -> Signature:
    """Signs a 32-byte digest; the result is always low-s (libsecp256k1 normalises s)."""
    raw = coincurve.PrivateKey(_key_bytes(private_key)).sign_recoverable(digest, hasher=None)
    return Signature(v=27 + raw[64], r=raw[:32], s=raw[32:64])


def recover(digest: bytes, signature: Signature) -> str:
    """Checksummed address that signed `digest`; rejects high-s and malformed signatures."""
    if not signature.is_low_s:
        raise SignatureError("high-s signature (malleable) rejected")
    if signature.v not in (27, 28):
        raise SignatureError(f"bad recovery id v={signature.v}")
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature.r + signature.s + bytes([signature.v - 27]), digest, hasher=None
        )
    except Exception as exc:  # coincurve raises a bare Exception on invalid signatures
        raise SignatureError("signature does not recover") from exc
    return to_checksum_address(keccak(public.format(compressed=False)[1:])[-20:])


def address_of(private_key: bytes | str) -> str:
    """Checksummed address of a private key."""
    public = coincurve.PrivateKey(_key_bytes(private_key)).public_key.format(compressed=False)
    return to_checksum_address(keccak(public[1:])[-20:])


def sign_request(request: InferenceRequest, domain: Domain, private_key: bytes | str) -> Signature:
    """Payer side: signs a request with the payer's key or one of its authorised signer keys."""
    return sign_digest(request.digest(domain), private_key)


def sign_usage_record(record: UsageRecord, domain: Domain, private_key: bytes | str) -> Signature:
    """Node side: signs a usage record with the node's record-signing key."""
    return sign_digest(record.digest(domain), private_key)


def typed_data(domain: Domain, message: InferenceRequest | UsageRecord) -> dict[str, Any]:
    """The full EIP-712 JSON document (as `eth_signTypedData_v4` and wallets take it)."""
    if isinstance(message, InferenceRequest):
        primary, fields = "InferenceRequest", REQUEST_FIELDS
    else:
        primary, fields = "UsageRecord", RECORD_FIELDS
    values = {n: ("0x" + v.hex() if isinstance(v, bytes) else v) for n, v in message.message().items()}
    return {
        "types": {
            "EIP712Domain": [{"name": n, "type": t} for n, t in DOMAIN_FIELDS],
            primary: [{"name": n, "type": t} for n, t in fields],
        },
        "primaryType": primary,
        "domain": domain.as_dict(),
        "message": values,
    }
