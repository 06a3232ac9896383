"""Where adapters come from. Every source yields a local directory holding a PEFT adapter; the
manager validates it the same way whatever the source."""

from __future__ import annotations

import abc
import logging
import re
from pathlib import Path

from node.adapters.errors import AdapterUnavailableError
from node.adapters.ipfs.cids import parse_cid
from node.adapters.ipfs.errors import IpfsError
from node.adapters.peft_format import CONFIG_FILE

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterSource(abc.ABC):
    content_addressed = False  # True: an adapter's identity (`canonical`) is its CID, its content never changes

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Adapters this source can list (for /v1/models); it may know more than it lists."""

    @abc.abstractmethod
    async def canonical(self, name: str) -> str | None:
        """The adapter's identity (its key: e.g. its CID) if `name` refers to one of this source's
        adapters, else None. Names with the same identity share one load and one device slot.
        Async: a source may have to ask elsewhere (the on-chain registry); it raises
        AdapterUnavailableError when it cannot tell now."""

    @abc.abstractmethod
    async def fetch(self, key: str) -> Path:
        """A local directory with the files of the adapter `key` (from `canonical`), verified by the source."""

    def local_path(self, key: str) -> Path | None:
        """The adapter's directory if it is on local disk now (no fetch), else None."""
        return None

    def version(self, key: str) -> object:
        """A value that changes whenever the adapter's content may have changed; None for content
        that never changes (content-addressed). A refusal is remembered until it changes."""
        return None

    # Optional hooks: a source without a cache of its own has nothing to do.
    def accepted(self, name: str) -> None:  # noqa: B027
        """The adapter `fetch` gave passed validation (a cache may now make room for it). Blocking."""

    def refused(self, name: str) -> None:  # noqa: B027
        """The adapter `fetch` gave failed validation (a cache drops it). Blocking."""

    def cache_stats(self) -> dict[str, int]:
        """Counters and sizes of the source's local cache, for /metrics (none by default)."""
        return {}


def _is_cid(name: str) -> bool:
    try:
        parse_cid(name)
    except IpfsError:
        return False
    return True


class LocalAdapterSource(AdapterSource):
    """A directory of adapters, one sub-directory each; the sub-directory name is the model name.

    A sub-directory named like a CID is no adapter: a CID names verified IPFS content (what a payer is billed
    for), and the engine acquires an adapter by the key its request resolved to (a CID for IPFS and registry
    adapters), asking this source first, so such a directory would stand in for that content."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"adapter directory {root} does not exist")
        self.root = root

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if self.has(p.name))

    def has(self, name: str) -> bool:
        return bool(ADAPTER_NAME.match(name)) and (self.root / name / CONFIG_FILE).is_file() and not _is_cid(name)

    async def canonical(self, name: str) -> str | None:
        return name if self.has(name) else None

    def local_path(self, key: str) -> Path | None:
        return self.root / key if self.has(key) else None

    def version(self, key: str) -> object:
        """The directory's files by name, modification time, size and inode: an edit or a copy
        over it changes it."""
        try:
            stats = [(f.name, f.stat()) for f in (self.root / key).iterdir()]
        except OSError:
            return None
        return tuple(sorted((n, st.st_mtime_ns, st.st_size, st.st_ino) for n, st in stats))

    async def fetch(self, key: str) -> Path:
        path = self.root / key
        if not path.is_dir():
            # The path is the operator's: logged here, never told to the client.
            log.warning("local adapter %r disappeared: %s is no longer a directory", key, path)
            raise AdapterUnavailableError(f"adapter {key!r} is no longer in this node's adapter directory")
        return path
