"""EIP-712 types of OpenLoRA protocol v2: the single source of truth for `InferenceRequest` and `UsageRecord`.

Both types are signed under the domain {name "OpenLoRA", version "2", chainId, verifyingContract: the
UsageSettlement contract}. The Solidity side (`contracts/src/UsageTypes.sol`) spells the same type strings;
`tests/attribution/test_types.py` proves the contract hashes random structs exactly as this module does and
that eth-account's generic EIP-712 encoder gives the same digests.

Field order (it is part of the signed type, never reorder):

    InferenceRequest(address payer,address node,uint64 adapterId,bytes32 promptHash,uint32 inputTokens,
                     uint32 maxTokens,uint128 maxCharge,uint128 cumulativeCap,uint64 deadline)
        signed by the payer or a signer it authorised in the PaymentEscrow. `node` and `promptHash` bind
        the request to one node and one prompt (`adapterId` 0 is the base model); `inputTokens` is the
        prompt's token count, which the payer computes and signs; `maxTokens` caps the output tokens,
        `maxCharge` the charge (OPEN wei). `cumulativeCap` is the running total of the caps the payer
        has signed for this node: the request authorises the interval (cumulativeCap - maxCharge,
        cumulativeCap], which is also its identity (two requests of one payer for one node conflict
        iff their intervals overlap), and the settlement never takes more from the payer's account with
        the node than the highest cumulativeCap it signed. `deadline` is a unix time.

    UsageRecord(bytes32 requestDigest,uint32 termsVersion,uint32 outputTokens,uint128 adapterAmount,
                uint128 charge,bytes32 responseHash,uint64 servedAt)
        signed by the node. `requestDigest` is the request's EIP-712 digest (payer, adapter and input
        tokens are read from the request); `termsVersion` is the adapter terms version in force at
        `servedAt` (0 for the base model); `adapterAmount = priceIn * inputTokens + priceOut * outputTokens`
        at that version and `charge = adapterAmount + nodeFeePerToken * (inputTokens + outputTokens)`.

Wire form (HTTP headers and response bodies, see docs/dapp.md): the message as JSON with the EIP-712
field names, addresses and bytes32 as 0x hex, every integer as a decimal string (uint128 does not fit a
JavaScript number).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any, ClassVar

from eth_hash.auto import keccak
from eth_utils import is_hex_address, to_checksum_address

from attribution.errors import SignatureError

DOMAIN_NAME = "OpenLoRA"
DOMAIN_VERSION = "2"

# secp256k1 group order; a signature is canonical ("low-s") when s <= N // 2.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

BASE_MODEL_ADAPTER_ID = 0

REQUEST_FIELDS: tuple[tuple[str, str], ...] = (
    ("payer", "address"),
    ("node", "address"),
    ("adapterId", "uint64"),
    ("promptHash", "bytes32"),
    ("inputTokens", "uint32"),
    ("maxTokens", "uint32"),
    ("maxCharge", "uint128"),
    ("cumulativeCap", "uint128"),
    ("deadline", "uint64"),
)
RECORD_FIELDS: tuple[tuple[str, str], ...] = (
    ("requestDigest", "bytes32"),
    ("termsVersion", "uint32"),
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


def type_string(name: str, fields_: tuple[tuple[str, str], ...]) -> str:
    """EIP-712 `encodeType` of a struct with only atomic members."""
    return f"{name}(" + ",".join(f"{t} {n}" for n, t in fields_) + ")"


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
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise ValueError(f"{value!r} does not fit {abi_type}")
        return value.to_bytes(32, "big")
    raise ValueError(f"unsupported atomic type {abi_type}")


def encode_words(fields_: tuple[tuple[str, str], ...], values: tuple[Any, ...]) -> bytes:
    return b"".join(encode_word(t, v) for (_, t), v in zip(fields_, values, strict=True))


def _to_wire(abi_type: str, value: Any) -> str:
    if abi_type == "bytes32":
        return "0x" + bytes(value).hex()
    if abi_type == "address":
        return to_checksum_address(value)
    return str(value)


def _from_wire(name: str, abi_type: str, value: Any) -> Any:
    """One field from its wire form; raises ValueError naming the field."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {type(value).__name__}")
    if abi_type == "address":
        if not is_hex_address(value):
            raise ValueError(f"{name}: not a 20-byte 0x address")
        return to_checksum_address(value)
    if abi_type == "bytes32":
        if not value.startswith("0x") or len(value) != 66:
            raise ValueError(f"{name}: expected 0x and 64 hex digits")
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            raise ValueError(f"{name}: not hex") from None
    if not value.isdigit() or (len(value) > 1 and value[0] == "0"):
        raise ValueError(f"{name}: expected a decimal integer string without sign or leading zeros")
    number = int(value)
    if number >= 1 << int(abi_type[4:]):
        raise ValueError(f"{name}: {value} does not fit {abi_type}")
    return number


class _Struct:
    """Shared behaviour of the two signed structs: field order = `FIELDS`, hashing, wire form."""

    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    TYPEHASH: ClassVar[bytes]

    def as_tuple(self) -> tuple[Any, ...]:
        """Values in field order (also the contract ABI tuple)."""
        return astuple(self)  # type: ignore[call-overload]

    def struct_hash(self) -> bytes:
        return keccak(self.TYPEHASH + encode_words(self.FIELDS, self.as_tuple()))

    def digest(self, domain: Domain) -> bytes:
        return typed_digest(domain, self.struct_hash())

    def message(self) -> dict[str, Any]:
        """EIP-712 field names -> Python values."""
        return dict(zip((n for n, _ in self.FIELDS), self.as_tuple(), strict=True))

    def to_wire(self) -> dict[str, str]:
        """The JSON wire form: 0x hex for addresses and bytes32, decimal strings for integers."""
        return {n: _to_wire(t, v) for (n, t), v in zip(self.FIELDS, self.as_tuple(), strict=True)}

    @classmethod
    def from_wire(cls, data: Any) -> Any:
        """Parses the wire form; raises ValueError saying which field is wrong (or missing / extra)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = [n for n, _ in cls.FIELDS]
        missing = [n for n in names if n not in data]
        extra = sorted(set(data) - set(names))
        if missing or extra:
            raise ValueError(f"missing fields {missing}" if missing else f"unknown fields {extra}")
        return cls(*(_from_wire(n, t, data[n]) for n, t in cls.FIELDS))  # type: ignore[call-arg]


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
class InferenceRequest(_Struct):
    """What a payer signs to buy one inference. Field order = `REQUEST_FIELDS`."""

    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = REQUEST_FIELDS
    TYPEHASH: ClassVar[bytes] = REQUEST_TYPEHASH

    payer: str
    node: str
    adapter_id: int
    prompt_hash: bytes
    input_tokens: int
    max_tokens: int
    max_charge: int
    cumulative_cap: int
    deadline: int

    @property
    def interval(self) -> tuple[int, int]:
        """(low, high]: the slice of the payer's cumulative authorisation this request holds."""
        return self.cumulative_cap - self.max_charge, self.cumulative_cap

    @property
    def well_formed(self) -> bool:
        """A request authorises a non-empty interval that starts at or above zero."""
        return self.max_charge > 0 and self.cumulative_cap >= self.max_charge


@dataclass(frozen=True, slots=True)
class UsageRecord(_Struct):
    """What a node signs for each answer. Field order = `RECORD_FIELDS`."""

    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = RECORD_FIELDS
    TYPEHASH: ClassVar[bytes] = RECORD_TYPEHASH

    request_digest: bytes
    terms_version: int
    output_tokens: int
    adapter_amount: int
    charge: int
    response_hash: bytes
    served_at: int


def intervals_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two half-open-below intervals (low, high] share any value."""
    return a[0] < b[1] and b[0] < a[1]


@dataclass(frozen=True, slots=True)
class Signature:
    """A secp256k1 signature as the contracts take it: v in {27, 28}, r and s as 32 bytes each."""

    v: int
    r: bytes
    s: bytes

    def to_bytes(self) -> bytes:
        """65 bytes r || s || v (the usual wire form)."""
        return self.r + self.s + bytes([self.v])

    def to_hex(self) -> str:
        return "0x" + self.to_bytes().hex()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Signature:
        """Parses r || s || v. A 64-byte compact (EIP-2098) signature is refused: the contracts take v, r, s."""
        if len(raw) == 64:
            raise SignatureError("compact (EIP-2098, 64-byte) signatures are not accepted; send r || s || v (65 bytes)")
        if len(raw) != 65:
            raise SignatureError(f"a signature is 65 bytes, got {len(raw)}")
        v = raw[64] if raw[64] >= 27 else raw[64] + 27
        return cls(v=v, r=raw[:32], s=raw[32:64])

    @classmethod
    def from_hex(cls, text: str) -> Signature:
        if not text.startswith("0x"):
            raise SignatureError("a signature is 0x followed by 130 hex digits")
        try:
            raw = bytes.fromhex(text[2:])
        except ValueError:
            raise SignatureError("a signature is 0x followed by 130 hex digits") from None
        return cls.from_bytes(raw)

    @property
    def is_low_s(self) -> bool:
        return int.from_bytes(self.s, "big") <= SECP256K1_N // 2


def typed_digest(domain: Domain, struct_hash: bytes) -> bytes:
    """keccak256("\\x19\\x01" || domainSeparator || structHash)."""
    return keccak(b"\x19\x01" + domain.separator() + struct_hash)


def typed_data(domain: Domain, message: InferenceRequest | UsageRecord) -> dict[str, Any]:
    """The full EIP-712 JSON document (as `eth_signTypedData_v4` and wallets take it)."""
    primary = type(message).__name__
    values = {n: ("0x" + v.hex() if isinstance(v, bytes) else v) for n, v in message.message().items()}
    return {
        "types": {
            "EIP712Domain": [{"name": n, "type": t} for n, t in DOMAIN_FIELDS],
            primary: [{"name": n, "type": t} for n, t in message.FIELDS],
        },
        "primaryType": primary,
        "domain": domain.as_dict(),
        "message": values,
    }
