"""Our importer gives Kubo's CIDs (`ipfs add --cid-version=1`): known vectors, and a cross-check
against Helia's importer run with Kubo's options on the same bytes (through the local node's
`/api/v0/add`). Its CAR is byte-identical to the one the node exports (depth-first, no dups)."""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from node.adapters.ipfs import (
    CHUNK_SIZE,
    MAX_LINKS,
    LocalIpfsNode,
    SourceChanged,
    UnsupportedEntry,
    import_directory,
    import_file,
)
from node.adapters.ipfs.gateway import CAR_ACCEPT

from .cars import car_of, split_car

AddFn = Callable[..., Awaitable[dict[str, str]]]

EMPTY_FILE = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
HELLO_WORLD = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"  # b"hello world", no newline
EMPTY_DIR = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(("data", "cid"), [(b"", EMPTY_FILE), (b"hello world", HELLO_WORLD)])
def test_known_kubo_file_cids(tmp_path: Path, data: bytes, cid: str) -> None:
    dag = import_file(_write(tmp_path / "f", data))
    assert str(dag.root) == cid
    assert dag.dag_size == len(data)


def test_known_kubo_empty_directory_cid(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert str(import_directory(tmp_path / "d").root) == EMPTY_DIR


@pytest.mark.parametrize(
    "size",
    [1, 1000, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 17],
)
async def test_file_cids_equal_helias_with_kubo_options(tmp_path: Path, helia_add: AddFn, size: int) -> None:
    data = _random(size, size)
    theirs = await helia_add({"f": data})
    assert str(import_file(_write(tmp_path / "f", data)).root) == theirs["f"]


@pytest.mark.parametrize(
    ("chunk", "chunks"),
    [
        (256, MAX_LINKS),
        (256, MAX_LINKS + 1),
        (256, 2 * MAX_LINKS + 3),
        pytest.param(64, MAX_LINKS * MAX_LINKS + 1, marks=pytest.mark.slow),  # 30k blocks: ~10 s in Helia
    ],
    ids=["one-full-node", "second-layer", "second-layer-3", "third-layer"],
)
async def test_balanced_layers_equal_helias(tmp_path: Path, helia_add: AddFn, chunk: int, chunks: int) -> None:
    """The layout, with small chunks (Kubo's --chunker=size-N) so that deep trees stay cheap."""
    data = _random(chunk * chunks - (chunk // 2 if chunks > MAX_LINKS else 0), chunks)
    theirs = await helia_add({"f": data}, chunk_size=chunk)
    assert str(import_file(_write(tmp_path / "f", data), chunk_size=chunk).root) == theirs["f"]


@pytest.mark.slow
@pytest.mark.parametrize("size", [MAX_LINKS * CHUNK_SIZE, MAX_LINKS * CHUNK_SIZE + 1])
async def test_big_file_cids_equal_helias(tmp_path: Path, helia_add: AddFn, size: int) -> None:
    data = _random(size, 7)
    theirs = await helia_add({"f": data})
    assert str(import_file(_write(tmp_path / "f", data)).root) == theirs["f"]


def _adapter_tree(root: Path) -> dict[str, bytes | None]:
    files: dict[str, bytes | None] = {
        "adapter_config.json": b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}',
        "adapter_model.safetensors": _random(2 * CHUNK_SIZE + 1234, 1),
        "README.md": b"# demo adapter\n",
        "Zeta": b"",  # sorts before lower case by bytes
        "\u00e9t\u00e9.txt": b"unicode names sort by their UTF-8 bytes",
        "sub/inner.bin": _random(5000, 2),
        "sub/same.bin": _random(5000, 2),  # a duplicate: one block, linked twice
        "sub/deeper/empty": b"",
        "empty-dir": None,
    }
    for rel, data in files.items():
        if data is None:
            (root / rel).mkdir(parents=True)
        else:
            _write(root / rel, data)
    return files


async def test_directory_cid_equals_helias(tmp_path: Path, helia_add: AddFn) -> None:
    files = _adapter_tree(tmp_path / "adapter")
    theirs = await helia_add({f"adapter/{rel}": data for rel, data in files.items()})
    ours = import_directory(tmp_path / "adapter")
    assert str(ours.root) == theirs["adapter"]
    assert str(import_directory(tmp_path / "adapter" / "sub").root) == theirs["adapter/sub"]


async def test_car_is_byte_identical_to_the_nodes_export(
    tmp_path: Path, helia_add: AddFn, ipfs_node: LocalIpfsNode
) -> None:
    files = _adapter_tree(tmp_path / "adapter")
    theirs = await helia_add({f"adapter/{rel}": data for rel, data in files.items()})
    dag = import_directory(tmp_path / "adapter")
    async with aiohttp.ClientSession() as session:
        url = f"{ipfs_node.gateway_url}/ipfs/{theirs['adapter']}?format=car"
        async with session.get(url, headers={"Accept": CAR_ACCEPT}) as resp:
            assert resp.status == 200
            exported = await resp.read()
    assert car_of(dag) == exported


def test_hidden_entries_are_skipped_unless_asked_for(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "x", b"1")
    _write(tmp_path / "b" / "x", b"1")
    _write(tmp_path / "b" / ".git" / "HEAD", b"ref")
    assert import_directory(tmp_path / "a").root == import_directory(tmp_path / "b").root
    assert import_directory(tmp_path / "a").root != import_directory(tmp_path / "b", include_hidden=True).root


def test_symlinks_and_wrong_kinds_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "real", b"x")
    os.symlink(tmp_path / "d" / "real", tmp_path / "d" / "link")
    with pytest.raises(UnsupportedEntry, match="symbolic link"):
        import_directory(tmp_path / "d")
    with pytest.raises(UnsupportedEntry, match="not a regular file"):
        import_file(tmp_path / "d")
    with pytest.raises(UnsupportedEntry, match="not a directory"):
        import_directory(tmp_path / "d" / "real")


def test_a_file_changed_after_hashing_never_reaches_the_car(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", _random(CHUNK_SIZE * 2, 3))
    dag = import_file(path)
    with open(path, "r+b") as f:  # same size, one byte flipped, mtime restored
        stat = os.fstat(f.fileno())
        f.seek(CHUNK_SIZE + 5)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(SourceChanged):
        car_of(dag)
    path.write_bytes(b"shorter")
    with pytest.raises(SourceChanged):
        car_of(dag)


def test_car_holds_each_block_once_root_first(tmp_path: Path) -> None:
    path = _write(tmp_path / "zeros", bytes(3 * CHUNK_SIZE))  # three identical leaves
    dag = import_file(path)
    roots, sections = split_car(car_of(dag))
    assert roots == [dag.root] and len(sections) == 2  # the root node, then the one leaf
    assert sections[0][0] == bytes(dag.root)
