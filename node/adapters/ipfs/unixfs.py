"""UnixFS v1: the `Data` protobuf inside dag-pb nodes, and the dag-pb nodes Kubo builds.

    message Data {                      // field numbers as in the UnixFS spec
      required DataType Type = 1;       // Raw 0, Directory 1, File 2, Metadata 3, Symlink 4, HAMTShard 5
      optional bytes Data = 2;          // file bytes held by this node itself (CIDv0 leaves)
      optional uint64 filesize = 3;     // file bytes under this node
      repeated uint64 blocksizes = 4;   // file bytes under each link, in link order
      optional uint64 hashType = 5;  optional uint64 fanout = 6;   // HAMT shards only
      optional uint32 mode = 7;      optional UnixTime mtime = 8;  // ignored: never applied
    }

The dag-pb envelope (links, then data) is encoded with `ipld_dag_pb` and decoded by our own strict
decoder (`decode_node`, on the hot path of verification). Kubo writes an empty (present) name on
file links, no `Data` field on internal file nodes, and only `Type` on directories;
`file_node` and `directory_node` do the same, so our CIDs are Kubo's.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import ipld_dag_pb

from node.adapters.ipfs.cids import cid_of, key_str, read_block_cid
from node.adapters.ipfs.errors import IpfsError, UnixFSError


class NodeType(enum.IntEnum):
    RAW = 0
    DIRECTORY = 1
    FILE = 2
    METADATA = 3
    SYMLINK = 4
    HAMT_SHARD = 5


@dataclass(frozen=True, slots=True)
class UnixFSData:
    type: NodeType
    data: bytes = b""
    filesize: int | None = None
    blocksizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Link:
    name: str | None
    key: bytes  # see cids.py
    tsize: int | None  # cumulative serialized size of the linked DAG (advisory: never trusted)


@dataclass(frozen=True, slots=True)
class DagPbNode:
    unixfs: UnixFSData
    links: tuple[Link, ...]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_data(u: UnixFSData) -> bytes:
    out = bytearray(b"\x08" + _varint(u.type))
    if u.data:
        out += b"\x12" + _varint(len(u.data)) + u.data
    if u.filesize is not None:
        out += b"\x18" + _varint(u.filesize)
    for size in u.blocksizes:
        out += b"\x20" + _varint(size)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def decode_data(buf: bytes) -> UnixFSData:
    """Parse a UnixFS `Data` message; unknown fields are skipped, as protobuf requires."""
    node_type: int | None = None
    data = b""
    filesize: int | None = None
    blocksizes: list[int] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            if field == 1:
                node_type = value
            elif field == 3:
                filesize = value
            elif field == 4:
                blocksizes.append(value)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("field runs past the end")
            chunk = buf[pos : pos + length]
            pos += length
            if field == 2:
                data = chunk
            elif field == 4:  # packed blocksizes: legal protobuf, though Kubo never writes it
                p = 0
                while p < len(chunk):
                    value, p = _read_varint(chunk, p)
                    blocksizes.append(value)
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(buf):
        raise ValueError("field runs past the end")
    if node_type is None:
        raise ValueError("missing Type")
    try:
        kind = NodeType(node_type)
    except ValueError:
        raise ValueError(f"unknown node type {node_type}") from None
    return UnixFSData(kind, bytes(data), filesize, tuple(blocksizes))


def _encode(data: bytes, links: list[ipld_dag_pb.PBLink]) -> bytes:
    return bytes(ipld_dag_pb.encode(ipld_dag_pb.PBNode(data, links)))


def file_node(children: Sequence[tuple[bytes, int, int]]) -> bytes:
    """An internal file node over `children` given as (key, file bytes, tsize), in file order."""
    unixfs = UnixFSData(NodeType.FILE, filesize=sum(c[1] for c in children), blocksizes=tuple(c[1] for c in children))
    links = [ipld_dag_pb.PBLink(cid_of(key), "", tsize) for key, _, tsize in children]
    return _encode(encode_data(unixfs), links)


def directory_node(entries: Sequence[tuple[str, bytes, int]]) -> bytes:
    """A directory over `entries` given as (name, key, tsize); links sorted by UTF-8 name bytes."""
    ordered = sorted(entries, key=lambda e: e[0].encode("utf-8"))
    links = [ipld_dag_pb.PBLink(cid_of(key), name, tsize) for name, key, tsize in ordered]
    return _encode(encode_data(UnixFSData(NodeType.DIRECTORY)), links)


def decode_node(key: bytes, block: bytes | memoryview) -> DagPbNode:
    """Decode a dag-pb block holding UnixFS; raises `UnixFSError` (or `UnsupportedCid` for a link
    to a block we cannot verify).

    Our own decoder rather than `ipld_dag_pb.decode`: this is the trust boundary, and building a
    `multiformats.CID` per link (with its runtime type checks) made verification 3x slower.
    dag-pb's canonical form is enforced: links (Hash, Name, Tsize, in that order), then Data.
    """
    buf = bytes(block)
    try:
        links, data = _decode_pb_node(buf)
        unixfs = decode_data(data)
    except IpfsError:
        raise  # a link to a CID we cannot verify: UnsupportedCid / InvalidCid
    except ValueError as exc:
        raise UnixFSError(f"block {key_str(key)} is not valid dag-pb UnixFS ({exc})") from None
    return DagPbNode(unixfs, tuple(links))


def _decode_pb_node(buf: bytes) -> tuple[list[Link], bytes]:
    links: list[Link] = []
    data: bytes | None = None
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        length, pos = _read_varint(buf, pos)
        end = pos + length
        if tag & 7 != 2 or end > len(buf):
            raise ValueError("malformed protobuf")
        if tag >> 3 == 2 and data is None:
            links.append(_decode_pb_link(buf[pos:end]))
        elif tag >> 3 == 1 and data is None:
            data = buf[pos:end]
        else:
            raise ValueError("fields out of order or unknown")
        pos = end
    if data is None:
        raise ValueError("no UnixFS data")
    return links, data


def _decode_pb_link(buf: bytes) -> Link:
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if field not in (1, 2, 3) or any(f >= field for f in fields) or wire != (0 if field == 3 else 2):
            raise ValueError("malformed link")
        if wire == 0:
            fields[field], pos = _read_varint(buf, pos)
        else:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("malformed link")
            fields[field] = buf[pos : pos + length]
            pos += length
    cid = fields.get(1)
    if not isinstance(cid, bytes):
        raise ValueError("link without a CID")
    link_key, size = read_block_cid(memoryview(cid))
    if size != len(cid):
        raise ValueError("malformed link CID")
    name = fields.get(2)
    tsize = fields.get(3)
    return Link(
        name.decode("utf-8") if isinstance(name, bytes) else None,
        link_key,
        tsize if isinstance(tsize, int) else None,
    )
