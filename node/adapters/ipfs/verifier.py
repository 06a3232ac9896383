"""Verify a CAR against the CID that was asked for, and rebuild its files, as the bytes stream in.

Nothing from the network is trusted. For each block, as soon as it is complete:
1. its bytes must hash to the multihash in its CID (`BlockHashMismatch`);
2. it is placed where the DAG says it belongs. Each dag-pb node that arrives turns its links into
   *slots*: "materialize this CID at this path" (directory entries) or "these are bytes
   [offset, offset + size) of this file" (file chunks, sizes from the parent's `blocksizes`).
   A raw block with a slot is written straight into its file with `pwrite`; no file is ever
   held in memory.
Blocks may come in any order: a block that arrives before the node linking to it is spooled to
disk until its slot appears, and a CID linked twice (deduplicated content) is replayed from where
it was first put. At the end every slot must have been filled (`MissingBlock`) and every block
must have been linked from the root (`UnreferencedBlock`). Sizes are checked at every level
(`UnixFSError`), and the caps bound memory, disk and time whatever the DAG claims
(`SizeLimitExceeded`).

Output goes to a private work directory beside the destination; only a fully verified tree is
renamed into place (`VerifiedDownload`), so a failure leaves nothing at the destination. A failure
to write (a full or read-only disk) is a `StorageError`. The work directory
(`.<cid>.partial-<random>`) holds a lock for as long as its download is alive, so a process killed
mid-download leaves a directory that `remove_abandoned_downloads` recognises and deletes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from multiformats import CID

from node.adapters.ipfs.car import CarParser
from node.adapters.ipfs.cids import RAW, check_block, key_of, key_str, parse_cid
from node.adapters.ipfs.errors import (
    IpfsError,
    MissingBlock,
    SizeLimitExceeded,
    StorageError,
    UnexpectedRoot,
    UnixFSError,
    UnreferencedBlock,
)
from node.adapters.ipfs.unixfs import DagPbNode, NodeType, decode_node

_ENTRY, _CHUNK = 0, 1
_MAX_OPEN_FILES = 32
_MAX_NAME_BYTES = 255
READ_SIZE = 4 * 1024 * 1024
PARTIAL_MARK = ".partial-"  # work directories are `.<dest name>.partial-<random>`
_LOCK_FILE = "lock"
# A work directory without its lock file is younger than this only in the instant between its
# creation and the lock's: older, its download died there.
_UNLOCKED_GRACE_S = 60.0


@dataclass(slots=True)
class _Slot:
    kind: int  # _ENTRY: materialize the block at `path`; _CHUNK: it is bytes of the file at `path`
    path: str
    offset: int = 0
    size: int = 0


def max_blocks_for(max_bytes: int) -> int:
    """Blocks and links allowed for a DAG of at most `max_bytes`: one per KiB (Kubo's chunks are
    256 KiB) plus room for small files and directories."""
    return max_bytes // 1024 + 1024


class DagAssembler:
    """Places hash-checked blocks of the DAG under `root_key` at `out_path` (see the module doc)."""

    def __init__(self, root_key: bytes, out_path: Path, spool_path: Path, max_bytes: int) -> None:
        self._out = str(out_path)
        self._spool = os.open(spool_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._spool_size = 0
        self._max_bytes = max_bytes
        self._max_blocks = max_blocks_for(max_bytes)
        self._declared_bytes = 0
        self._blocks = 0
        self._slots = 0
        # key -> where its bytes can be read again: (path, offset, size); path None = the spool
        self._stored: dict[bytes, tuple[str | None, int, int]] = {}
        self._pending: dict[bytes, list[_Slot]] = {}
        self._referenced: set[bytes] = set()
        self._replay: list[tuple[bytes, _Slot]] = []
        self._fds: OrderedDict[str, int] = OrderedDict()
        self.files: list[str] = []
        self.dirs: list[str] = []
        self._place(root_key, _Slot(_ENTRY, self._out))

    def add_block(self, key: bytes, data: memoryview | bytes) -> None:
        """Take one block whose hash was already checked against `key`."""
        self._blocks += 1
        if self._blocks > self._max_blocks:
            raise SizeLimitExceeded("the CAR's number of blocks", self._max_blocks, "blocks")
        if key in self._stored:
            return  # a duplicate (dups=y): same hash, same bytes, already placed
        slots = self._pending.pop(key, None)
        if slots and key[1] == RAW:
            first = slots[0]
            self._stored[key] = (first.path, first.offset, len(data))
        else:  # dag-pb nodes are kept for replay; early blocks wait for their slot
            self._stored[key] = (None, self._spool_size, len(data))
            os.pwrite(self._spool, data, self._spool_size)
            self._spool_size += len(data)
        for slot in slots or ():
            self._fill(key, data, slot)
        while self._replay:
            key, slot = self._replay.pop()
            self._fill(key, self._read(self._stored[key]), slot)

    def finish(self) -> None:
        """Check completeness; then every file under `out_path` is complete and verified."""
        if self._pending:
            raise MissingBlock(key_str(next(iter(self._pending))))
        for key in self._stored:
            if key not in self._referenced:
                raise UnreferencedBlock(key_str(key))
        self.close()

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        if self._spool >= 0:
            os.close(self._spool)
            self._spool = -1

    def _place(self, key: bytes, slot: _Slot) -> None:
        self._slots += 1
        if self._slots > self._max_blocks:
            raise SizeLimitExceeded("the DAG's number of links", self._max_blocks, "links")
        self._referenced.add(key)
        if key in self._stored:
            self._replay.append((key, slot))
        else:
            self._pending.setdefault(key, []).append(slot)

    def _fill(self, key: bytes, data: memoryview | bytes, slot: _Slot) -> None:
        if key[1] == RAW:
            if slot.kind == _ENTRY:
                self._create_file(slot.path, len(data))
            elif len(data) != slot.size:
                raise UnixFSError(f"block {key_str(key)} holds {len(data)} bytes, its parent says {slot.size}")
            self._write(slot.path, slot.offset, data)
            return
        node = decode_node(key, data)
        kind = node.unixfs.type
        if slot.kind == _ENTRY and kind == NodeType.DIRECTORY:
            self._directory(key, node, slot.path)
        elif kind in (NodeType.FILE, NodeType.RAW):
            if slot.kind == _ENTRY:
                u = node.unixfs
                size = u.filesize if u.filesize is not None else len(u.data) + sum(u.blocksizes)
                self._create_file(slot.path, size)
                slot = _Slot(_CHUNK, slot.path, 0, size)
            self._file_part(key, node, slot)
        else:
            where = "a directory entry" if slot.kind == _ENTRY else "part of a file"
            raise UnixFSError(f"block {key_str(key)} is a UnixFS {kind.name.lower()}, not supported as {where}")

    def _file_part(self, key: bytes, node: DagPbNode, slot: _Slot) -> None:
        u = node.unixfs
        if len(u.blocksizes) != len(node.links):
            raise UnixFSError(f"block {key_str(key)} has {len(node.links)} links but {len(u.blocksizes)} block sizes")
        total = len(u.data) + sum(u.blocksizes)
        if total != slot.size or (u.filesize is not None and u.filesize != slot.size):
            raise UnixFSError(f"block {key_str(key)}: file sizes do not add up ({total} bytes, expected {slot.size})")
        if u.data:
            self._write(slot.path, slot.offset, u.data)
        offset = slot.offset + len(u.data)
        for link, size in zip(node.links, u.blocksizes):
            self._place(link.key, _Slot(_CHUNK, slot.path, offset, size))
            offset += size

    def _directory(self, key: bytes, node: DagPbNode, path: str) -> None:
        os.mkdir(path, 0o755)
        self.dirs.append(path)
        names: set[str] = set()
        for link in node.links:
            name = link.name or ""
            if name in ("", ".", "..") or "/" in name or "\x00" in name or len(name.encode("utf-8")) > _MAX_NAME_BYTES:
                raise UnixFSError(f"directory {key_str(key)} has an unsafe entry name {name[:80]!r}")
            if name in names:
                raise UnixFSError(f"directory {key_str(key)} lists {name[:80]!r} twice")
            names.add(name)
            self._place(link.key, _Slot(_ENTRY, os.path.join(path, name)))

    def _create_file(self, path: str, size: int) -> None:
        self._declared_bytes += size
        if self._declared_bytes > self._max_bytes:
            raise SizeLimitExceeded("the files in the DAG", self._max_bytes)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(fd, size)
        self.files.append(path)
        self._cache_fd(path, fd)

    def _write(self, path: str, offset: int, data: memoryview | bytes) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_WRONLY)
            self._cache_fd(path, fd)
        else:
            self._fds.move_to_end(path)
        written = os.pwrite(fd, data, offset)
        if written != len(data):  # regular files only come up short when the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def _cache_fd(self, path: str, fd: int) -> None:
        self._fds[path] = fd
        if len(self._fds) > _MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])

    def _read(self, where: tuple[str | None, int, int]) -> bytes:
        path, offset, size = where
        if path is None:
            return os.pread(self._spool, size, offset)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)


class CarVerifier:
    """Feed a CAR stream for `root`; it is parsed, hash-checked and assembled as it arrives."""

    def __init__(self, root: CID, out_path: Path, spool_path: Path, max_bytes: int) -> None:
        self._root = root
        self._root_key = key_of(root)
        self._max_bytes = max_bytes
        self._received = 0
        self._parser = CarParser()
        self._assembler = DagAssembler(self._root_key, out_path, spool_path, max_bytes)
        self._roots_checked = False

    @property
    def assembler(self) -> DagAssembler:
        return self._assembler

    def feed(self, chunk: bytes | memoryview) -> None:
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise SizeLimitExceeded("the CAR", self._max_bytes)
        blocks = self._parser.feed(chunk)
        if not self._roots_checked and self._parser.roots is not None:
            self._check_roots(self._parser.roots)
        for key, data in blocks:
            check_block(key, data)
            self._assembler.add_block(key, data)

    def finish(self) -> None:
        self._parser.close()
        self._assembler.finish()

    def _check_roots(self, roots: list[CID]) -> None:
        try:
            keys = [key_of(r) for r in roots]
        except IpfsError:
            keys = []
        if keys != [self._root_key]:
            raise UnexpectedRoot(str(self._root), [str(r) for r in roots])
        self._roots_checked = True


class VerifiedDownload:
    """Receive a CAR for `root` into `dest` (a path that must not exist yet), atomically.

        with VerifiedDownload(root, dest, max_bytes=...) as download:
            for chunk in stream:
                download.feed(chunk)
            path = download.commit()

    Everything is written into a work directory beside `dest` (same filesystem) and renamed to
    `dest` only by `commit()`, after the last check; leaving the block without committing (an
    exception) deletes the work directory. `durable=True` fsyncs files and directories before
    the rename, so that after a crash `dest` is either complete or absent. Any failure to write
    (disk full, read-only, I/O error) raises `StorageError`.
    """

    def __init__(self, root: CID | str, dest: Path, *, max_bytes: int, durable: bool = True) -> None:
        self.root = parse_cid(root)
        self.dest = Path(dest)
        self.max_bytes = max_bytes
        self.durable = durable
        self._work: Path | None = None
        self._lock = -1
        self._verifier: CarVerifier | None = None

    def __enter__(self) -> VerifiedDownload:
        if self.dest.exists():
            raise FileExistsError(f"{self.dest} already exists")
        try:
            self._work = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}{PARTIAL_MARK}", dir=self.dest.parent))
            self._lock = os.open(self._work / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX)  # held until __exit__, or released by our death
            self._verifier = CarVerifier(self.root, self._work / "root", self._work / "spool", self.max_bytes)
        except OSError as exc:
            self._cleanup()
            raise StorageError(str(self.dest.parent), exc) from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup()

    def feed(self, chunk: bytes | memoryview) -> None:
        assert self._verifier is not None
        with self._storage_errors():
            self._verifier.feed(chunk)

    def commit(self) -> Path:
        assert self._verifier is not None and self._work is not None
        with self._storage_errors():
            self._verifier.finish()
            if self.durable:
                _fsync_tree(self._verifier.assembler)
        if self.dest.exists():
            raise FileExistsError(f"{self.dest} already exists")
        with self._storage_errors():
            os.rename(self._work / "root", self.dest)
            if self.durable:
                _fsync_path(self.dest.parent)
        return self.dest

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        try:
            yield
        except IpfsError:
            raise
        except OSError as exc:
            raise StorageError(str(self.dest.parent), exc) from exc

    def _cleanup(self) -> None:
        if self._verifier is not None:
            self._verifier.assembler.close()
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def partial_downloads(directory: Path) -> list[Path]:
    """The work directories of downloads into `directory`, alive or abandoned."""
    try:
        return [p for p in directory.iterdir() if p.name.startswith(".") and PARTIAL_MARK in p.name and p.is_dir()]
    except FileNotFoundError:
        return []


def download_alive(work: Path) -> bool:
    """Whether the download that owns the work directory `work` is still running (in any process)."""
    try:
        fd = os.open(work / _LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return time.time() - work.stat().st_mtime < _UNLOCKED_GRACE_S
        except FileNotFoundError:
            return False  # it finished (or failed) and was removed meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_abandoned_downloads(directory: Path) -> list[Path]:
    """Delete the work directories in `directory` whose download died (a killed process); returns them."""
    removed = []
    for work in partial_downloads(directory):
        if not download_alive(work):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def verify_car_file(car: Path | BinaryIO, root: CID | str, dest: Path, *, max_bytes: int, durable: bool = True) -> Path:
    """Verify a CAR file (or binary file object) for `root` and materialize it at `dest`."""
    if isinstance(car, Path):
        with open(car, "rb") as f:
            return verify_car_file(f, root, dest, max_bytes=max_bytes, durable=durable)
    # One reused buffer: fresh 4 MiB objects per read cost page faults; nothing keeps a view of
    # a chunk after feed() returns (the parser copies a block that straddles two chunks).
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    with VerifiedDownload(root, dest, max_bytes=max_bytes, durable=durable) as download:
        while n := car.readinto(view):
            download.feed(view[:n])
        return download.commit()


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(assembler: DagAssembler) -> None:
    for path in assembler.files:
        _fsync_path(path)
    for path in assembler.dirs:
        _fsync_path(path)
