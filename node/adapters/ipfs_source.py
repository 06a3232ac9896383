"""Adapters by IPFS CID: fetched from trustless gateways, verified block by block, cached on disk.

A request names an adapter by CID (`ipfs://<cid>` or the bare CID) or by a name that the node's
adapter index maps to a CID. Whatever the name, the adapter's identity is its CID (CIDv1, base32):
two names for the same content share one fetch, one host copy and one device slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
from pathlib import Path

from node.adapters.errors import AdapterNotFoundError, AdapterUnavailableError, InvalidAdapterError
from node.adapters.ipfs import (
    AllGatewaysFailed,
    GatewayError,
    InvalidCid,
    IpfsError,
    SizeLimitExceeded,
    StorageError,
    fetch_verified,
    parse_cid,
    partial_downloads,
    remove_abandoned_downloads,
)
from node.adapters.sources import AdapterSource

_STAMP = ".last-used"
# What CIDs look like: CIDv0 (base58btc, "Qm...") and CIDv1 in base32 ("baf..."), the forms IPFS tools print.
_CID_LIKE = re.compile(r"^(Qm|baf)[A-Za-z0-9]+$")
log = logging.getLogger(__name__)


def parse_adapter_cid(name: str) -> str | None:
    """The canonical CID string (CIDv1 base32) if `name` is a CID or an ipfs:// URL, else None."""
    text = name.removeprefix("ipfs://").rstrip("/")
    if not text or "/" in text:
        return None
    try:
        return str(parse_cid(text).set(version=1, base="base32"))
    except (InvalidCid, ValueError, KeyError):
        return None


def cid_problem(name: str) -> str | None:
    """Why `name`, an `ipfs://` URL or something that looks like a CID, names no adapter we can
    fetch (malformed, or a codec or hash we do not verify); None when it is fine or no CID at all."""
    text = name.removeprefix("ipfs://").rstrip("/")
    if not name.startswith("ipfs://") and not _CID_LIKE.match(text):
        return None
    if "/" in text:
        return f"{name!r} is a path inside a CID; an adapter is named by its root CID alone"
    try:
        parse_cid(text)
    except IpfsError as exc:
        return str(exc)
    return None


def read_index(path: Path) -> dict[str, str]:
    """The adapter index file: name -> canonical CID. Raises ValueError on a malformed file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the adapter index ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the adapter index must be a JSON object of name -> CID")
    index = {}
    for name, cid in raw.items():
        canonical = parse_adapter_cid(str(cid))
        if canonical is None or parse_adapter_cid(name) is not None:
            raise ValueError(f"{path}: {name!r} -> {cid!r} is not a name -> CID entry")
        index[name] = canonical
    return index


class DiskCache:
    """Verified adapter directories by CID, bounded in bytes, least recently used evicted first.

    Downloads in progress (their `.<cid>.partial-*` work directories) count against the bound but
    are never evicted. Work directories whose download died with its process (a crash, SIGKILL)
    are deleted when the cache is opened; `leftovers_removed` counts them.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        removed = remove_abandoned_downloads(root)
        self.leftovers_removed = len(removed)
        if removed:
            log.warning("removed %d abandoned partial download(s) from %s", len(removed), root)

    def path(self, cid: str) -> Path:
        return self.root / cid

    def get(self, cid: str) -> Path | None:
        path = self.path(cid)
        if not path.is_dir():
            return None
        (path / _STAMP).touch()
        return path

    def remove(self, cid: str) -> None:
        shutil.rmtree(self.path(cid), ignore_errors=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every cached adapter."""
        out = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            stamp = path / _STAMP
            try:
                used = stamp.stat().st_mtime if stamp.exists() else path.stat().st_mtime
            except FileNotFoundError:
                continue  # evicted or refused meanwhile
            out.append((used, _tree_bytes(path), path))
        return out

    def partial_bytes(self) -> int:
        """Bytes held by downloads in progress (files are sized in full when they are created)."""
        return sum(_tree_bytes(p) for p in partial_downloads(self.root))

    def stats(self) -> dict[str, int]:
        return {
            "verified_bytes": sum(size for _, size, _ in self.entries()),
            "partial_bytes": self.partial_bytes(),
            "leftovers_removed": self.leftovers_removed,
        }

    def trim(self, keep: str | None = None) -> list[str]:
        """Evict least recently used adapters until the cache, downloads in progress included,
        fits; never `keep`."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries) + self.partial_bytes()
        evicted = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path.name == keep:
                continue
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            evicted.append(path.name)
        return evicted


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path`, tolerating files that vanish while we look."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total


class IpfsAdapterSource(AdapterSource):
    content_addressed = True

    def __init__(
        self,
        gateways: list[str],
        cache: DiskCache,
        *,
        index_file: Path | None = None,
        max_adapter_bytes: int = 256 << 20,
        timeout: float = 30.0,
    ) -> None:
        if not gateways:
            raise ValueError("at least one IPFS gateway is needed")
        self.gateways = gateways
        self.cache = cache
        self.index_file = index_file
        self.max_adapter_bytes = max_adapter_bytes
        self.timeout = timeout
        self._index: dict[str, str] = {}
        self._index_mtime = -1.0
        self._fetches: dict[str, asyncio.Future[Path]] = {}
        self.fetches = 0  # verified downloads completed (cache misses)

    # -- names -----------------------------------------------------------------------------------

    def index(self) -> dict[str, str]:
        """name -> canonical CID, from the index file (re-read when it changes)."""
        if self.index_file is None or not self.index_file.is_file():
            return {}
        mtime = self.index_file.stat().st_mtime
        if mtime != self._index_mtime:
            self._index_mtime = mtime
            try:
                self._index = read_index(self.index_file)
            except ValueError as exc:  # keep serving with the last good index
                log.error("adapter index not reloaded: %s", exc)
        return self._index

    def names(self) -> list[str]:
        return sorted(self.index())

    def cid_of(self, name: str) -> str | None:
        """The CID `name` is (a CID or ipfs:// URL) or names in the index; None for any other name."""
        # a CID is itself; the index only names what is not a CID (publish refuses CID-like names)
        return parse_adapter_cid(name) or self.index().get(name)

    async def canonical(self, name: str) -> str | None:
        return self.cid_of(name)

    # -- content ---------------------------------------------------------------------------------

    async def fetch(self, name: str) -> Path:
        cid = self.cid_of(name)
        if cid is None:
            raise AdapterUnavailableError(f"{name!r} is neither a CID nor an indexed adapter name")
        cached = self.cache.get(cid)
        if cached is not None:
            return cached
        pending = self._fetches.get(cid)
        if pending is None:  # concurrent requests for one CID share one download
            pending = self._fetches[cid] = asyncio.ensure_future(self._download(cid))
            pending.add_done_callback(lambda _: self._fetches.pop(cid, None))
        return await asyncio.shield(pending)

    async def _download(self, cid: str) -> Path:
        try:
            path = await fetch_verified(
                cid, self.gateways, self.cache.root, max_bytes=self.max_adapter_bytes, timeout=self.timeout
            )
        except AllGatewaysFailed as exc:
            log.warning("adapter %s: %s", cid, exc)  # the details (gateway URLs) stay in the log
            if any(isinstance(e, SizeLimitExceeded) for e in exc.errors):
                raise InvalidAdapterError(
                    f"adapter {cid} is larger than this node's limit of {self.max_adapter_bytes} bytes", "too_large"
                ) from None
            if exc.errors and all(isinstance(e, GatewayError) and e.status in (404, 410) for e in exc.errors):
                raise AdapterNotFoundError(f"no IPFS gateway of this node has adapter {cid}") from None
            kinds = ", ".join(sorted({type(e).__name__ for e in exc.errors}))
            raise AdapterUnavailableError(
                f"adapter {cid} could not be fetched from this node's {len(self.gateways)} gateway(s) ({kinds})"
            ) from None
        except StorageError as exc:
            raise self._storage_failure(cid, exc) from None
        except IpfsError as exc:
            log.warning("adapter %s: %s", cid, exc)
            raise AdapterUnavailableError(f"adapter {cid} could not be fetched ({type(exc).__name__})") from None
        if not path.is_dir():
            path.unlink(missing_ok=True)
            raise InvalidAdapterError(f"adapter {cid} is a single file; an adapter is a directory")
        try:
            (path / _STAMP).touch()
        except OSError as exc:
            self.cache.remove(cid)
            raise self._storage_failure(cid, StorageError(str(self.cache.root), exc)) from None
        self.fetches += 1
        return path

    def _storage_failure(self, cid: str, exc: StorageError) -> AdapterUnavailableError:
        log.error("adapter %s: %s", cid, exc)  # the path stays in the log
        if exc.disk_full:
            return AdapterUnavailableError(
                f"adapter {cid} could not be stored: this node's adapter cache disk is full", "disk_full"
            )
        return AdapterUnavailableError(
            f"adapter {cid} could not be stored on this node's adapter cache disk ({exc.cause})",
            "disk_error",
        )

    # -- the manager's verdicts ------------------------------------------------------------------

    def accepted(self, name: str) -> None:
        """Only a validated adapter may make the cache evict others (junk never pushes one out)."""
        cid = self.cid_of(name)
        if cid is not None:
            self.cache.trim(keep=cid)

    def refused(self, name: str) -> None:
        cid = self.cid_of(name)
        if cid is not None:
            self.cache.remove(cid)

    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats()
