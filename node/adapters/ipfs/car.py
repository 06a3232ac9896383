"""CARv1 (content addressable archive): framing, header, and a push parser.

    CAR     = frame(header) frame(section)*
    frame   = varint(len(body)) body
    header  = dag-cbor {"roots": [CID, ...], "version": 1}
    section = CID bytes (CIDv0: the bare 34-byte multihash; CIDv1: version, codec, multihash) + block

`CarParser` is sans-IO: feed it bytes as they arrive (from a socket or a file) and it returns the
blocks completed so far as (key, block) pairs, each block a zero-copy view into the fed bytes
except when a block straddles two feeds. It checks framing only; the verifier checks hashes.
"""

from __future__ import annotations

from collections.abc import Sequence

import dag_cbor
from multiformats import CID

from node.adapters.ipfs.cids import read_block_cid
from node.adapters.ipfs.errors import CarFormatError, IpfsError, TruncatedCar

CAR_MEDIA_TYPE = "application/vnd.ipld.car"
MAX_HEADER_BYTES = 64 * 1024
# Bitswap refuses blocks over 2 MiB, so no IPFS DAG has bigger ones; Kubo's chunks are 256 KiB.
MAX_BLOCK_BYTES = 2 * 1024 * 1024 + 1024
_MAX_VARINT_BYTES = 9  # enough for 2**63


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_header(roots: Sequence[CID]) -> bytes:
    body = dag_cbor.encode({"roots": list(roots), "version": 1})
    return varint(len(body)) + body


def section_prefix(key: bytes, block_size: int) -> bytes:
    """Frame length and CID of a section; the block's bytes follow it."""
    return varint(len(key) + block_size) + key


def decode_header(body: bytes | memoryview) -> list[CID]:
    try:
        header = dag_cbor.decode(bytes(body))
    except Exception as exc:  # dag_cbor raises its own error types for any malformed input
        raise CarFormatError("the CAR header is not valid dag-cbor") from exc
    if not isinstance(header, dict) or "version" not in header:
        raise CarFormatError("the CAR header has no version")
    if header["version"] == 2:
        raise CarFormatError("CARv2 is not supported: ask for version=1")
    if header["version"] != 1:
        raise CarFormatError(f"unsupported CAR version {header['version']!r}")
    roots = header.get("roots")
    if not isinstance(roots, list) or not roots or not all(isinstance(r, CID) for r in roots):
        raise CarFormatError("the CAR header must list at least one root CID")
    return roots


def _read_varint(view: memoryview, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when `view` ends inside the varint."""
    value = shift = 0
    for i in range(pos, min(len(view), pos + _MAX_VARINT_BYTES)):
        b = view[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    if len(view) - pos >= _MAX_VARINT_BYTES:
        raise CarFormatError("malformed length prefix in the CAR")
    return None


class CarParser:
    """Incremental CARv1 parser. `roots` is set once the header has been read."""

    def __init__(self, max_block_bytes: int = MAX_BLOCK_BYTES) -> None:
        self.roots: list[CID] | None = None
        self.blocks_read = 0
        self._max_block = max_block_bytes
        self._pending = bytearray()  # the start of a frame that straddles feeds
        self._frame_size = 0  # total size of the pending frame, once its prefix is known

    def feed(self, chunk: bytes | memoryview) -> list[tuple[bytes, memoryview]]:
        out: list[tuple[bytes, memoryview]] = []
        view = memoryview(chunk)
        pos = 0
        if self._pending:
            pos = self._complete_pending(view, out)
            if self._pending:
                return out
        while pos < len(view):
            frame = self._frame_bounds(view, pos)
            if frame is None or frame[1] > len(view):
                break
            self._take(view[frame[0] : frame[1]], out)
            pos = frame[1]
        if pos < len(view):
            self._pending += view[pos:]
            bounds = self._frame_bounds(memoryview(self._pending), 0)
            self._frame_size = bounds[1] if bounds else 0
        return out

    def close(self) -> None:
        """Call at the end of the stream: raises `TruncatedCar` if it stopped mid-frame."""
        if self.roots is None:
            raise TruncatedCar("the CAR stream ended before its header was complete")
        if self._pending:
            raise TruncatedCar(f"the CAR stream ended inside a block (after {self.blocks_read} complete blocks)")

    def _complete_pending(self, view: memoryview, out: list[tuple[bytes, memoryview]]) -> int:
        pos = 0
        if not self._frame_size:  # the length prefix itself was cut: add bytes until it is whole
            while pos < len(view) and not self._frame_size:
                self._pending.append(view[pos])
                pos += 1
                bounds = self._frame_bounds(memoryview(self._pending), 0)
                self._frame_size = bounds[1] if bounds else 0
            if not self._frame_size:
                return pos
        take = min(self._frame_size - len(self._pending), len(view) - pos)
        self._pending += view[pos : pos + take]
        pos += take
        if len(self._pending) == self._frame_size:
            whole = memoryview(bytes(self._pending))
            start = self._frame_bounds(whole, 0)[0]  # type: ignore[index]
            self._pending.clear()
            self._frame_size = 0
            self._take(whole[start:], out)
        return pos

    def _frame_bounds(self, view: memoryview, pos: int) -> tuple[int, int] | None:
        """(start of body, end of frame) of the frame at `pos`, or None if its prefix is incomplete."""
        prefix = _read_varint(view, pos)
        if prefix is None:
            return None
        size, start = prefix
        limit = MAX_HEADER_BYTES if self.roots is None else self._max_block + 64
        if size == 0:
            raise CarFormatError("empty section in the CAR")
        if size > limit:
            what = "header" if self.roots is None else "block"
            raise CarFormatError(f"CAR {what} of {size} bytes is larger than the {limit}-byte maximum")
        return start, start + size

    def _take(self, body: memoryview, out: list[tuple[bytes, memoryview]]) -> None:
        if self.roots is None:
            self.roots = decode_header(body)
            return
        try:
            key, cid_size = read_block_cid(body)
        except IpfsError:
            raise
        except Exception as exc:
            raise CarFormatError("malformed CID in a CAR section") from exc
        out.append((key, body[cid_size:]))
        self.blocks_read += 1
