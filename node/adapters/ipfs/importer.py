"""A UnixFS importer that gives the CIDs of Kubo's `ipfs add --cid-version=1`, and streams the DAG
as a CARv1.

Kubo's choices, reproduced here:
- fixed-size chunks of 256 KiB, each a raw block (CIDv1, codec raw); an empty file is one empty
  raw block; a one-chunk file *is* its raw block;
- balanced layout: chunks are grouped 174 to a dag-pb file node, those nodes again 174 to a
  parent, until one root remains (a file of 175 chunks is a root over two nodes: 174 and 1);
- directories are dag-pb nodes linking each entry by name, sorted by UTF-8 bytes; hidden entries
  (name starting with ".") are skipped unless asked for, as `ipfs add -r` does without `--hidden`.

Two passes keep memory bounded: `import_*` reads and hashes every file once and keeps only the
DAG's shape (36 bytes per 256 KiB chunk, plus the few small dag-pb nodes); `UnixfsDag.car_chunks`
then re-reads each chunk while writing the CAR (root first, then depth-first, each block once),
re-hashing it so that a file that changed in between cannot produce a CAR with wrong blocks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from multiformats import CID

from node.adapters.ipfs.car import encode_header, section_prefix
from node.adapters.ipfs.cids import DAG_PB, RAW, cid_of, make_key
from node.adapters.ipfs.errors import SourceChanged, UnsupportedEntry
from node.adapters.ipfs.unixfs import directory_node, file_node

CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 1024 * 1024  # Kubo's limit for --chunker=size-N
MAX_LINKS = 174


@dataclass(slots=True)
class _Leaf:
    key: bytes
    offset: int  # where its bytes sit in the file
    size: int

    @property
    def tsize(self) -> int:
        return self.size


@dataclass(slots=True)
class _FileNode:
    key: bytes
    block: bytes
    children: list[_Leaf | _FileNode]
    size: int  # file bytes under this node
    tsize: int  # serialized bytes of this node and everything under it


@dataclass(slots=True)
class _File:
    path: Path
    size: int
    mtime_ns: int
    root: _Leaf | _FileNode

    @property
    def key(self) -> bytes:
        return self.root.key

    @property
    def tsize(self) -> int:
        return self.root.tsize


@dataclass(slots=True)
class _Dir:
    key: bytes
    block: bytes
    entries: list[tuple[str, _File | _Dir]]  # sorted by name bytes, as linked
    tsize: int


class UnixfsDag:
    """An imported file or directory: its root CID, and its blocks as a CARv1 on demand."""

    def __init__(self, root: _File | _Dir) -> None:
        self._root = root
        self.root: CID = cid_of(root.key)
        self.dag_size = root.tsize  # bytes of all blocks (Kubo's cumulative size)

    def car_chunks(self) -> Iterator[bytes]:
        """The CARv1, in pieces: header, then every block once, root first, depth-first."""
        yield encode_header([self.root])
        yield from self._sections(self._root, set())

    def write_car(self, out: Path | BinaryIO) -> int:
        """Write the CAR to a path or a binary file object; returns its size in bytes."""
        if isinstance(out, Path):
            with open(out, "wb") as f:
                return self.write_car(f)
        written = 0
        for chunk in self.car_chunks():
            out.write(chunk)
            written += len(chunk)
        return written

    def _sections(self, item: _File | _Dir, seen: set[bytes]) -> Iterator[bytes]:
        if item.key in seen:
            return
        if isinstance(item, _File):
            yield from _file_sections(item, seen)
            return
        seen.add(item.key)
        yield section_prefix(item.key, len(item.block))
        yield item.block
        for _, entry in item.entries:
            yield from self._sections(entry, seen)


def import_file(path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> UnixfsDag:
    """Hash a regular file the way `ipfs add --cid-version=1` does. `chunk_size` is Kubo's
    `--chunker=size-N`; keep the default to get the CIDs everyone else gets."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise UnsupportedEntry(f"{path.name!r} is not a regular file")
    return UnixfsDag(_plan_file(path, _check_chunk_size(chunk_size)))


def import_directory(
    path: str | os.PathLike[str], *, include_hidden: bool = False, chunk_size: int = CHUNK_SIZE
) -> UnixfsDag:
    """Hash a directory tree the way `ipfs add -r --cid-version=1` does (an adapter directory:
    `adapter_config.json`, `adapter_model.safetensors`, maybe a README)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise UnsupportedEntry(f"{path.name!r} is not a directory")
    return UnixfsDag(_plan_directory(path, include_hidden, _check_chunk_size(chunk_size)))


def _check_chunk_size(chunk_size: int) -> int:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes")
    return chunk_size


def _plan_directory(path: Path, include_hidden: bool, chunk_size: int) -> _Dir:
    entries: list[tuple[str, _File | _Dir]] = []
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            if name.startswith(".") and not include_hidden:
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsupportedEntry(f"file name {name!r} is not valid UTF-8") from None
            if entry.is_symlink():
                raise UnsupportedEntry(f"{name!r} is a symbolic link: not added")
            if entry.is_dir(follow_symlinks=False):
                entries.append((name, _plan_directory(Path(entry.path), include_hidden, chunk_size)))
            elif entry.is_file(follow_symlinks=False):
                entries.append((name, _plan_file(Path(entry.path), chunk_size)))
            else:
                raise UnsupportedEntry(f"{name!r} is not a regular file or directory")
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    block = directory_node([(name, item.key, item.tsize) for name, item in entries])
    key = make_key(DAG_PB, hashlib.sha256(block).digest())
    return _Dir(key, block, entries, len(block) + sum(item.tsize for _, item in entries))


def _plan_file(path: Path, chunk_size: int) -> _File:
    leaves: list[_Leaf | _FileNode] = []
    with open(path, "rb", buffering=0) as f:
        stat = os.fstat(f.fileno())
        offset = 0
        for chunk in _chunks(f, chunk_size):
            leaves.append(_Leaf(make_key(RAW, hashlib.sha256(chunk).digest()), offset, len(chunk)))
            offset += len(chunk)
    return _File(path, offset, stat.st_mtime_ns, _balance(leaves))


def _chunks(f: BinaryIO, chunk_size: int) -> Iterator[memoryview]:
    """Fixed-size chunks (the last one shorter); an empty file is one empty chunk."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    first = True
    while True:
        filled = 0
        while filled < chunk_size:
            n = f.readinto(view[filled:])
            if not n:
                break
            filled += n
        if filled or first:
            yield view[:filled]
        if filled < chunk_size:
            return
        first = False


def _balance(layer: list[_Leaf | _FileNode]) -> _Leaf | _FileNode:
    while len(layer) > 1:
        layer = [_file_node(layer[i : i + MAX_LINKS]) for i in range(0, len(layer), MAX_LINKS)]
    return layer[0]


def _file_node(children: list[_Leaf | _FileNode]) -> _FileNode:
    block = file_node([(c.key, c.size, c.tsize) for c in children])
    key = make_key(DAG_PB, hashlib.sha256(block).digest())
    return _FileNode(key, block, children, sum(c.size for c in children), len(block) + sum(c.tsize for c in children))


def _file_sections(file: _File, seen: set[bytes]) -> Iterator[bytes]:
    with open(file.path, "rb", buffering=0) as f:
        stat = os.fstat(f.fileno())
        if stat.st_size != file.size or stat.st_mtime_ns != file.mtime_ns:
            raise SourceChanged(f"{file.path.name!r} changed while it was being added")
        stack: list[_Leaf | _FileNode] = [file.root]
        while stack:
            item = stack.pop()
            if item.key in seen:
                continue
            seen.add(item.key)
            if isinstance(item, _FileNode):
                yield section_prefix(item.key, len(item.block))
                yield item.block
                stack.extend(reversed(item.children))
                continue
            data = os.pread(f.fileno(), item.size, item.offset)
            if len(data) != item.size or hashlib.sha256(data).digest() != item.key[4:]:
                raise SourceChanged(f"{file.path.name!r} changed while it was being added")
            yield section_prefix(item.key, item.size)
            yield data
