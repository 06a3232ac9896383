"""CIDs, UnixFS `Data`, dag-pb and CARv1 framing: encoders, strict decoders, the push parser."""

from __future__ import annotations

import hashlib

import dag_cbor
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID, varint

from node.adapters.ipfs import CarFormatError, CarParser, InvalidCid, TruncatedCar, UnsupportedCid, parse_cid
from node.adapters.ipfs.car import MAX_BLOCK_BYTES, encode_header
from node.adapters.ipfs.cids import DAG_PB, RAW, key_of, make_key, read_block_cid
from node.adapters.ipfs.errors import UnixFSError
from node.adapters.ipfs.unixfs import NodeType, UnixFSData, decode_data, decode_node, directory_node, encode_data

from .cars import build_car, file_node, pb_cid, raw_cid, section

EMPTY_DIR_V1 = (
    "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"  # `ipfs add -r --cid-version=1` of an empty dir
)


def test_cidv0_and_cidv1_of_one_dag_pb_block_share_a_key() -> None:
    block = directory_node([])
    v0, v1 = pb_cid(block, 0), pb_cid(block, 1)
    assert str(v0).startswith("Qm") and str(v1) == EMPTY_DIR_V1
    assert key_of(v0) == key_of(v1) == make_key(DAG_PB, hashlib.sha256(block).digest())
    assert read_block_cid(memoryview(bytes(v0))) == (key_of(v1), 34)
    assert read_block_cid(memoryview(bytes(v1))) == (key_of(v1), 36)


@pytest.mark.parametrize("text", ["", "hello", "bafy", "Qm" + "1" * 44, "zzzz"])
def test_parse_cid_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidCid):
        parse_cid(text)


def test_parse_cid_rejects_hashes_we_cannot_verify() -> None:
    sha512 = CID("base32", 1, "raw", ("sha2-512", hashlib.sha512(b"x").digest()))
    with pytest.raises(UnsupportedCid, match="sha2-256"):
        parse_cid(str(sha512))
    with pytest.raises(UnsupportedCid):
        read_block_cid(memoryview(bytes(sha512)))
    dag_cbor_cid = CID("base32", 1, "dag-cbor", ("sha2-256", bytes(32)))
    with pytest.raises(UnsupportedCid):
        parse_cid(dag_cbor_cid)


unixfs_data = st.builds(
    UnixFSData,
    st.sampled_from(list(NodeType)),
    st.binary(max_size=64),
    st.one_of(st.none(), st.integers(0, 2**63)),
    st.lists(st.integers(0, 2**63), max_size=5).map(tuple),
)


@settings(deadline=None)  # a wall-clock limit per example: a loaded CI machine stalls past 200 ms
@given(unixfs_data)
def test_unixfs_data_round_trips(u: UnixFSData) -> None:
    assert decode_data(encode_data(u)) == u


def test_unixfs_data_matches_kubo_bytes() -> None:
    # Type=File, filesize=300000, blocksizes=[262144, 37856]: the root of a 300000-byte file
    encoded = encode_data(UnixFSData(NodeType.FILE, filesize=300000, blocksizes=(262144, 37856)))
    assert encoded.hex() == "0802" + "18e0a712" + "20808010" + "20e0a702"  # Type, filesize, 2 x blocksizes


@pytest.mark.parametrize(
    "data",
    [b"", b"\x10\x02", b"\x08\x09", b"\x08", b"\x08\x02\x12\x05ab", b"\x08\x02\x1b"],
    ids=["no-type", "type-missing-wrong-field", "unknown-type", "truncated", "data-past-end", "bad-wire-type"],
)
def test_unixfs_data_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_data(data)


def test_decode_node_is_strict_dag_pb() -> None:
    leaf = raw_cid(b"x")
    good = file_node([(leaf, 1)])
    key = key_of(pb_cid(good))
    node = decode_node(key, good)
    assert node.unixfs.blocksizes == (1,) and node.links[0].key == key_of(leaf) and node.links[0].name == ""
    data_first = good[-6:] + good[:-6]  # Data before Links: not canonical dag-pb
    no_data = good[:-6]
    link_without_hash = b"\x12\x02\x18\x01" + good[-6:]
    for bad in (data_first, no_data, link_without_hash, b"\xff\xff", good + b"\x1a\x00"):
        with pytest.raises(UnixFSError):
            decode_node(key, bad)


# --- CAR ------------------------------------------------------------------------------------------


def _sample_car() -> tuple[CID, bytes, list[tuple[bytes, bytes]]]:
    blocks = [b"first block", b"", b"x" * 70000]
    leaves = [(raw_cid(b), len(b)) for b in blocks]
    root_block = file_node(leaves)
    root = pb_cid(root_block, 0)  # CIDv0 section, CIDv1 links
    sections = [section(root, root_block)] + [section(cid, b) for (cid, _), b in zip(leaves, blocks)]
    expected = [(key_of(CID.decode(cid)), block) for cid, block in sections]
    return root, build_car([root], sections), expected


def test_parser_reads_header_and_blocks_in_one_feed() -> None:
    root, car, expected = _sample_car()
    parser = CarParser()
    got = [(k, bytes(b)) for k, b in parser.feed(car)]
    parser.close()
    assert parser.roots == [root] and got == expected


@settings(deadline=None)
@given(st.lists(st.integers(0, 80000), max_size=12))
def test_parser_gives_the_same_blocks_however_the_stream_is_cut(cuts: list[int]) -> None:
    _, car, expected = _sample_car()
    bounds = sorted({min(c, len(car)) for c in cuts} | {0, len(car)})
    parser = CarParser()
    got = []
    for a, b in zip(bounds, bounds[1:]):
        got += [(k, bytes(v)) for k, v in parser.feed(car[a:b])]
    parser.close()
    assert got == expected


def test_parser_byte_by_byte() -> None:
    _, car, expected = _sample_car()
    parser = CarParser()
    got = [(k, bytes(v)) for i in range(len(car)) for k, v in parser.feed(car[i : i + 1])]
    parser.close()
    assert got == expected


def test_parser_reports_truncation() -> None:
    _, car, _ = _sample_car()
    for cut in (0, 3, 40, len(car) - 1, len(car) - 70000):
        parser = CarParser()
        parser.feed(car[:cut])
        with pytest.raises(TruncatedCar):
            parser.close()


def _header(obj: object) -> bytes:
    body = dag_cbor.encode(obj)
    return varint.encode(len(body)) + body


@pytest.mark.parametrize(
    ("car", "message"),
    [
        (_header({"version": 2}), "CARv2"),
        (_header({"roots": [raw_cid(b"")], "version": 3}), "version"),
        (_header({"roots": [], "version": 1}), "at least one root"),
        (_header({"roots": ["not a cid"], "version": 1}), "at least one root"),
        (_header([1, 2]), "no version"),
        (b"\x03\xff\xff\xff", "not valid dag-cbor"),
        (b"\xff" * 12, "malformed length"),
        (encode_header([raw_cid(b"")]) + b"\x00", "empty section"),
        (encode_header([raw_cid(b"")]) + varint.encode(MAX_BLOCK_BYTES + 100), "larger than"),
        (encode_header([raw_cid(b"")]) + b"\x05\x01\x55\x12\x20\x00", "truncated CID"),
    ],
)
def test_parser_rejects_malformed_cars(car: bytes, message: str) -> None:
    with pytest.raises((CarFormatError, InvalidCid), match=message):
        CarParser().feed(car)


def test_raw_leaf_key_is_codec_raw() -> None:
    assert key_of(raw_cid(b"abc"))[1] == RAW
