"""Hand-made blocks and CARs for the tests: honest ones in unusual shapes, and adversarial ones.

Written independently of `node.adapters.ipfs.car` (beyond its header encoder), so that a bug in
the parser cannot hide itself in the test data.
"""

from __future__ import annotations

import hashlib
import random

import dag_cbor
from multiformats import CID, varint

from node.adapters.ipfs.importer import UnixfsDag
from node.adapters.ipfs.unixfs import NodeType, UnixFSData, encode_data

Section = tuple[bytes, bytes]  # (CID bytes exactly as in the CAR, block)


def raw_cid(data: bytes) -> CID:
    return CID("base32", 1, "raw", ("sha2-256", hashlib.sha256(data).digest()))


def pb_cid(block: bytes, version: int = 1) -> CID:
    digest = hashlib.sha256(block).digest()
    if version == 0:
        return CID("base58btc", 0, "dag-pb", ("sha2-256", digest))
    return CID("base32", 1, "dag-pb", ("sha2-256", digest))


def pb_node(unixfs: UnixFSData, links: list[tuple[CID, str | None, int | None]]) -> bytes:
    """A dag-pb block: links (hash, name, tsize), then the UnixFS data. Encoded by hand."""
    out = bytearray()
    for cid, name, tsize in links:
        link = bytearray()
        h = bytes(cid)
        link += b"\x0a" + varint.encode(len(h)) + h
        if name is not None:
            n = name.encode("utf-8")
            link += b"\x12" + varint.encode(len(n)) + n
        if tsize is not None:
            link += b"\x18" + varint.encode(tsize)
        out += b"\x12" + varint.encode(len(link)) + link
    data = encode_data(unixfs)
    out += b"\x0a" + varint.encode(len(data)) + data
    return bytes(out)


def file_node(children: list[tuple[CID, int]], data: bytes = b"") -> bytes:
    sizes = tuple(size for _, size in children)
    unixfs = UnixFSData(NodeType.FILE, data, len(data) + sum(sizes), sizes)
    return pb_node(unixfs, [(cid, "", size) for cid, size in children])


def dir_node(entries: list[tuple[str, CID]]) -> bytes:
    ordered = sorted(entries, key=lambda e: e[0].encode())
    return pb_node(UnixFSData(NodeType.DIRECTORY), [(cid, name, 0) for name, cid in ordered])


def section(cid: CID, block: bytes) -> Section:
    return bytes(cid), block


def build_car(roots: list[CID], sections: list[Section]) -> bytes:
    header = dag_cbor.encode({"roots": roots, "version": 1})
    out = bytearray(varint.encode(len(header)) + header)
    for cid, block in sections:
        out += varint.encode(len(cid) + len(block)) + cid + block
    return bytes(out)


def split_car(car: bytes) -> tuple[list[CID], list[Section]]:
    size, n, _ = varint.decode_raw(car)
    roots = dag_cbor.decode(car[n : n + size])["roots"]
    pos = n + size
    sections = []
    while pos < len(car):
        size, n, _ = varint.decode_raw(car[pos:])
        body = car[pos + n : pos + n + size]
        cid_len = 34 if body[0] == 0x12 else 36
        sections.append((body[:cid_len], body[cid_len:]))
        pos += n + size
    return roots, sections


def car_of(dag: UnixfsDag) -> bytes:
    return b"".join(dag.car_chunks())


def shuffled(sections: list[Section], seed: int) -> list[Section]:
    out = list(sections)
    random.Random(seed).shuffle(out)
    return out
