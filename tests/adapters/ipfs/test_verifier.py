"""The streaming verifier: honest CARs in any shape rebuild the files exactly; every kind of bad
CAR is refused with its own error, leaving nothing at the destination."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiformats import CID

from node.adapters.ipfs import (
    BlockHashMismatch,
    MissingBlock,
    SizeLimitExceeded,
    TruncatedCar,
    UnexpectedRoot,
    UnixFSError,
    UnreferencedBlock,
    UnsupportedCid,
    VerifiedDownload,
    import_directory,
    import_file,
    verify_car_file,
)
from node.adapters.ipfs.unixfs import NodeType, UnixFSData

from ..conftest import tree_files
from .cars import build_car, car_of, dir_node, file_node, pb_cid, pb_node, raw_cid, section, shuffled, split_car

MiB = 1024 * 1024


def verify(car: bytes, root: CID | str, dest: Path, *, max_bytes: int = 64 * MiB, cuts: int = 1) -> Path:
    """Feed `car` in `cuts` pieces; returns the materialized path."""
    step = max(1, -(-len(car) // cuts))
    with VerifiedDownload(root, dest, max_bytes=max_bytes, durable=False) as download:
        for i in range(0, len(car), step):
            download.feed(car[i : i + step])
        return download.commit()


def rejects(error: type[Exception], car: bytes, root: CID | str, tmp_path: Path, **kw: int) -> Exception:
    """`car` must fail with `error`, leaving no trace beside the destination."""
    parent = tmp_path / "cache"
    parent.mkdir(exist_ok=True)
    with pytest.raises(error) as info:
        verify(car, root, parent / "out", **kw)
    assert list(parent.iterdir()) == []
    return info.value


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_bytes(b'{"r": 8}')
    (src / "adapter_model.safetensors").write_bytes(hashlib.shake_256(b"w").digest(700_000))
    (src / "README.md").write_bytes(b"")
    (src / "sub" / "copy.json").write_bytes(b'{"r": 8}')  # same block as adapter_config.json
    (src / "zeros").write_bytes(bytes(600_000))  # one leaf, linked twice, plus a shorter one
    return src


# --- honest CARs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cuts", [1, 7, 1000])
def test_round_trip_rebuilds_the_directory(adapter: Path, tmp_path: Path, cuts: int) -> None:
    dag = import_directory(adapter)
    out = verify(car_of(dag), dag.root, tmp_path / "out", cuts=cuts)
    assert tree_files(out) == tree_files(adapter)


@pytest.mark.parametrize("order", ["reversed", "shuffled", "with-duplicates"])
def test_any_block_order_and_duplicates_are_accepted(adapter: Path, tmp_path: Path, order: str) -> None:
    dag = import_directory(adapter)
    roots, sections = split_car(car_of(dag))
    if order == "reversed":
        sections = sections[::-1]
    elif order == "shuffled":
        sections = shuffled(sections, seed=3)
    else:
        sections = sections + shuffled(sections, seed=4)[:5]
    out = verify(build_car(roots, sections), dag.root, tmp_path / "out", cuts=5)
    assert tree_files(out) == tree_files(adapter)


def test_a_single_file_root_becomes_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello world")
    dag = import_file(tmp_path / "f")
    out = verify_car_file(io.BytesIO(car_of(dag)), dag.root, tmp_path / "out", max_bytes=MiB)
    assert out.read_bytes() == b"hello world"


def test_cidv0_dag_with_dag_pb_leaves(tmp_path: Path) -> None:
    """The shape of `ipfs add` with CIDv0: leaves are dag-pb file nodes holding their bytes."""
    leaves = [pb_node(UnixFSData(NodeType.FILE, chunk, len(chunk)), []) for chunk in (b"abc", b"defg")]
    top = file_node([(pb_cid(leaf, 0), size) for leaf, size in zip(leaves, (3, 4))], data=b"")
    root = pb_cid(dir_node([("file.txt", pb_cid(top, 0))]), 0)
    sections = [section(root, dir_node([("file.txt", pb_cid(top, 0))])), section(pb_cid(top, 0), top)]
    sections += [section(pb_cid(leaf, 0), leaf) for leaf in leaves]
    out = verify(build_car([root], sections), str(root), tmp_path / "out")
    assert (out / "file.txt").read_bytes() == b"abcdefg"


def test_destination_must_not_exist(adapter: Path, tmp_path: Path) -> None:
    dag = import_directory(adapter)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        verify(car_of(dag), dag.root, tmp_path / "out")


names = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..") and not n.startswith(".")
)
trees = st.recursive(
    st.binary(max_size=3000),
    lambda children: st.dictionaries(names, children, max_size=4),
    max_leaves=8,
)


def _materialize(path: Path, tree: bytes | dict) -> None:
    if isinstance(tree, bytes):
        path.write_bytes(tree)
        return
    path.mkdir()
    for name, child in tree.items():
        _materialize(path / name, child)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(names, trees, max_size=4), cuts=st.integers(1, 50), seed=st.integers(0, 1000))
def test_any_tree_in_any_order_round_trips(
    tmp_path_factory: pytest.TempPathFactory, tree: dict, cuts: int, seed: int
) -> None:
    base = tmp_path_factory.mktemp("tree")
    _materialize(base / "src", tree)
    dag = import_directory(base / "src", chunk_size=1024)
    roots, sections = split_car(car_of(dag))
    out = verify(build_car(roots, shuffled(sections, seed)), dag.root, base / "out", cuts=cuts)
    assert tree_files(out) == tree_files(base / "src")


# --- bad CARs -------------------------------------------------------------------------------------


def test_tampered_block(adapter: Path, tmp_path: Path) -> None:
    dag = import_directory(adapter)
    roots, sections = split_car(car_of(dag))
    cid, block = sections[-1]
    sections[-1] = (cid, block[:-1] + bytes([block[-1] ^ 1]))
    err = rejects(BlockHashMismatch, build_car(roots, sections), dag.root, tmp_path)
    assert err.cid == str(CID.decode(cid).set(base="base32"))


def test_car_for_another_root(adapter: Path, tmp_path: Path) -> None:
    dag = import_directory(adapter)
    (tmp_path / "other").write_bytes(b"something else")
    other = import_file(tmp_path / "other")
    rejects(UnexpectedRoot, car_of(other), dag.root, tmp_path)
    roots, sections = split_car(car_of(dag))  # right blocks, header claims two roots
    rejects(UnexpectedRoot, build_car([dag.root, other.root], sections), dag.root, tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_car(adapter: Path, tmp_path: Path, keep: float) -> None:
    dag = import_directory(adapter)
    car = car_of(dag)
    cut = max(1, int(len(car) * keep))
    rejects(TruncatedCar, car[:cut], dag.root, tmp_path)


def test_missing_block(adapter: Path, tmp_path: Path) -> None:
    dag = import_directory(adapter)
    roots, sections = split_car(car_of(dag))
    err = rejects(MissingBlock, build_car(roots, sections[:-1]), dag.root, tmp_path)
    assert err.cid == str(CID.decode(sections[-1][0]).set(base="base32"))


def test_extra_block(adapter: Path, tmp_path: Path) -> None:
    dag = import_directory(adapter)
    roots, sections = split_car(car_of(dag))
    stray = section(raw_cid(b"not part of this DAG"), b"not part of this DAG")
    err = rejects(UnreferencedBlock, build_car(roots, sections + [stray]), dag.root, tmp_path)
    assert err.cid == str(raw_cid(b"not part of this DAG"))


def test_car_larger_than_the_cap(adapter: Path, tmp_path: Path) -> None:
    dag = import_directory(adapter)
    car = car_of(dag)
    rejects(SizeLimitExceeded, car, dag.root, tmp_path, max_bytes=len(car) - 1, cuts=10)


def test_small_dag_declaring_huge_files(tmp_path: Path) -> None:
    """A 'zip bomb': one 256 KiB leaf linked 174 times, three levels deep, claims 1.3 TB."""
    leaf = bytes(262144)
    cid, size, sections = raw_cid(leaf), len(leaf), [section(raw_cid(leaf), leaf)]
    for _ in range(3):
        node = file_node([(cid, size)] * 174)
        cid, size = pb_cid(node), size * 174
        sections.insert(0, section(cid, node))
    rejects(SizeLimitExceeded, build_car([cid], sections), cid, tmp_path, max_bytes=8 * MiB)


def test_small_dag_with_millions_of_links(tmp_path: Path) -> None:
    """Zero-byte leaves add no file bytes, but each link costs work: links are capped too."""
    cid, sections = raw_cid(b""), [section(raw_cid(b""), b"")]
    for _ in range(4):
        node = file_node([(cid, 0)] * 174)
        cid = pb_cid(node)
        sections.insert(0, section(cid, node))
    rejects(SizeLimitExceeded, build_car([cid], sections), cid, tmp_path, max_bytes=8 * MiB)


def _dir_car(entries: list[tuple[str | None, CID]], blocks: list[tuple[CID, bytes]]) -> tuple[CID, bytes]:
    node = pb_node(UnixFSData(NodeType.DIRECTORY), [(cid, name, 1) for name, cid in entries])
    root = pb_cid(node)
    return root, build_car([root], [section(root, node)] + [section(c, b) for c, b in blocks])


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/etc", "nul\x00", None, "x" * 256])
def test_unsafe_entry_names(tmp_path: Path, name: str | None) -> None:
    root, car = _dir_car([(name, raw_cid(b"x"))], [(raw_cid(b"x"), b"x")])
    rejects(UnixFSError, car, root, tmp_path)


def test_duplicate_entry_names(tmp_path: Path) -> None:
    root, car = _dir_car([("a", raw_cid(b"x")), ("a", raw_cid(b"y"))], [(raw_cid(b"x"), b"x"), (raw_cid(b"y"), b"y")])
    rejects(UnixFSError, car, root, tmp_path)


def test_sizes_that_do_not_add_up(tmp_path: Path) -> None:
    leaf = b"12345"
    lying_parent = pb_node(UnixFSData(NodeType.FILE, b"", 6, (6,)), [(raw_cid(leaf), "", 5)])
    root = pb_cid(lying_parent)
    car = build_car([root], [section(root, lying_parent), section(raw_cid(leaf), leaf)])
    rejects(UnixFSError, car, root, tmp_path)
    wrong_total = pb_node(UnixFSData(NodeType.FILE, b"", 9, (5,)), [(raw_cid(leaf), "", 5)])
    root = pb_cid(wrong_total)
    rejects(UnixFSError, build_car([root], [section(root, wrong_total), section(raw_cid(leaf), leaf)]), root, tmp_path)
    missing_sizes = pb_node(UnixFSData(NodeType.FILE, b"", 5, ()), [(raw_cid(leaf), "", 5)])
    root = pb_cid(missing_sizes)
    rejects(
        UnixFSError, build_car([root], [section(root, missing_sizes), section(raw_cid(leaf), leaf)]), root, tmp_path
    )


@pytest.mark.parametrize("kind", [NodeType.SYMLINK, NodeType.HAMT_SHARD, NodeType.METADATA])
def test_unsupported_unixfs_kinds(tmp_path: Path, kind: NodeType) -> None:
    node = pb_node(UnixFSData(kind, b"/etc/passwd" if kind == NodeType.SYMLINK else b""), [])
    root, car = _dir_car([("x", pb_cid(node))], [(pb_cid(node), node)])
    rejects(UnixFSError, car, root, tmp_path)


def test_directory_inside_a_file(tmp_path: Path) -> None:
    inner = dir_node([])
    parent = file_node([(pb_cid(inner), 0)])
    root = pb_cid(parent)
    rejects(UnixFSError, build_car([root], [section(root, parent), section(pb_cid(inner), inner)]), root, tmp_path)


def test_block_with_an_unverifiable_hash(tmp_path: Path) -> None:
    sha512 = CID("base32", 1, "raw", ("sha2-512", hashlib.sha512(b"x").digest()))
    root, car = _dir_car([("x", raw_cid(b"x"))], [])
    car += bytes([len(bytes(sha512)) + 1]) + bytes(sha512) + b"x"
    rejects(UnsupportedCid, car, root, tmp_path)


def test_memory_stays_bounded_for_a_64_mib_file(tmp_path: Path) -> None:
    """Neither importing, writing the CAR, nor verifying holds the file (let alone twice)."""
    import tracemalloc

    size = 64 * MiB
    with open(tmp_path / "big", "wb") as f:
        for i in range(size // MiB):
            f.write(hashlib.shake_256(i.to_bytes(4, "big")).digest(MiB))
    tracemalloc.start()
    try:
        dag = import_file(tmp_path / "big")
        dag.write_car(tmp_path / "big.car")
        verify_car_file(tmp_path / "big.car", dag.root, tmp_path / "out", max_bytes=size + MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB, f"peak Python allocations {peak / MiB:.1f} MiB"
    assert (tmp_path / "out").stat().st_size == size
