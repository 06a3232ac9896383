"""CIDs as this package handles them: dag-pb or raw blocks, sha2-256, CIDv0 or CIDv1.

Inside the package a block is identified by its *key*: the binary CIDv1 (version, codec,
multihash). A CIDv0 `Qm...` is the same block as the dag-pb CIDv1 with the same multihash, so it
gets the same key. Public functions take and return `multiformats.CID`.
"""

from __future__ import annotations

import hashlib

from multiformats import CID, varint

from node.adapters.ipfs.errors import BlockHashMismatch, InvalidCid, UnsupportedCid

RAW = 0x55
DAG_PB = 0x70
SHA2_256 = 0x12
DIGEST_SIZE = 32
CODEC_NAMES = {RAW: "raw", DAG_PB: "dag-pb"}
# key = <0x01 version><codec><0x12 sha2-256><0x20 length><32-byte digest>: every varint is one byte
KEY_SIZE = 4 + DIGEST_SIZE
_V0_PREFIX = bytes([SHA2_256, DIGEST_SIZE])


def make_key(codec: int, digest: bytes) -> bytes:
    return bytes((1, codec, SHA2_256, DIGEST_SIZE)) + digest


def key_of(cid: CID) -> bytes:
    """The package's key for a `CID`; raises `UnsupportedCid` for other codecs or hashes."""
    codec = cid.codec.code
    if codec not in CODEC_NAMES or cid.hashfun.code != SHA2_256 or len(cid.raw_digest) != DIGEST_SIZE:
        raise UnsupportedCid(f"unsupported CID {cid}: only dag-pb or raw blocks hashed with sha2-256 are verified")
    return make_key(codec, bytes(cid.raw_digest))


def cid_of(key: bytes) -> CID:
    return CID("base32", 1, CODEC_NAMES[key[1]], ("sha2-256", key[4:]))


def key_str(key: bytes) -> str:
    return str(cid_of(key))


def parse_cid(value: str | bytes | CID) -> CID:
    """A `CID` from its string or binary form; raises `InvalidCid` or `UnsupportedCid`."""
    if isinstance(value, CID):
        cid = value
    else:
        try:
            cid = CID.decode(value)
        except Exception as exc:  # multiformats raises a zoo of types for malformed input
            raise InvalidCid(f"not a valid CID: {str(value)[:100]!r}") from exc
    key_of(cid)
    return cid


def read_block_cid(section: memoryview) -> tuple[bytes, int]:
    """The key of the CID at the start of a CAR section, and the CID's length in bytes."""
    if bytes(section[:2]) == _V0_PREFIX:
        if len(section) < 2 + DIGEST_SIZE:
            raise InvalidCid("truncated CIDv0 in CAR section")
        return make_key(DAG_PB, bytes(section[2 : 2 + DIGEST_SIZE])), 2 + DIGEST_SIZE
    head = bytes(section[:4])
    if len(head) == 4 and head[0] == 1 and head[1] in CODEC_NAMES and head[2] == SHA2_256 and head[3] == DIGEST_SIZE:
        if len(section) < KEY_SIZE:
            raise InvalidCid("truncated CID in CAR section")
        return bytes(section[:KEY_SIZE]), KEY_SIZE
    raise _describe_unsupported(bytes(section[:64]))


def _describe_unsupported(prefix: bytes) -> InvalidCid | UnsupportedCid:
    try:
        version, n, _ = varint.decode_raw(prefix)
        codec, m, _ = varint.decode_raw(prefix[n:])
        hashfun, _, _ = varint.decode_raw(prefix[n + m :])
    except Exception:
        return InvalidCid("malformed CID in CAR section")
    if version != 1:
        return InvalidCid(f"malformed CID in CAR section (version {version})")
    return UnsupportedCid(
        f"unsupported block CID (codec 0x{codec:x}, hash 0x{hashfun:x}): only dag-pb or raw blocks "
        "hashed with sha2-256 are verified"
    )


def check_block(key: bytes, data: bytes | memoryview) -> None:
    """Raise `BlockHashMismatch` unless `data` hashes to the digest in `key`."""
    if hashlib.sha256(data).digest() != key[4:]:
        raise BlockHashMismatch(key_str(key))
