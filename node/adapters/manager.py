"""Adapter lifecycle: from a source to host memory, shared by every request that names it.

    FETCHING -> VERIFIED (files on local disk) -> LOADED (validated, host memory) -> ACTIVE (in a
    device slot, managed by the engine's slot pool) | FAILED (reason kept; retried after a backoff)

An adapter that failed validation is refused again, without a fetch or a load, until its content
changes (`AdapterSource.version`): for a CID, whose content never changes, for as long as the
node runs (the last MAX_REMEMBERED_REFUSALS refusals are remembered).

Concurrent requests for the same adapter share one load. A request whose adapter is loading awaits
that load in its own task, so it never holds up requests for other adapters. The host tier keeps
the most recently used adapters (LRU, bounded by count); adapters held by in-flight requests are
never evicted.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from node.adapters.errors import AdapterNotFoundError, AdapterUnavailableError, InvalidAdapterError
from node.adapters.peft_format import BaseModelShape, LoraAdapter, check_adapter, load_adapter
from node.adapters.sources import AdapterSource
from node.threads import run_in_fresh_thread

log = logging.getLogger(__name__)

MAX_REMEMBERED_REFUSALS = 4096  # refused adapters kept out of /v1/models (oldest forgotten first)


class AdapterState(enum.StrEnum):
    FETCHING = "fetching"
    VERIFIED = "verified"
    LOADED = "loaded"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass
class _Entry:
    name: str
    source: AdapterSource
    state: AdapterState = AdapterState.FETCHING  # from its creation: its load task starts a loop turn later
    adapter: LoraAdapter | None = None
    refs: int = 0
    loading: asyncio.Future | None = None
    error: Exception | None = None
    failures: int = 0
    retry_at: float = 0.0


class AdapterManager:
    def __init__(
        self,
        sources: list[AdapterSource],
        base: BaseModelShape,
        max_rank: int,
        *,
        host_capacity: int = 64,
        max_bytes: int = 256 << 20,
        retry_backoff_s: float = 5.0,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (seconds) times the backoffs of failed adapters."""
        self.sources = sources
        self.base = base
        self.max_rank = max_rank
        self.host_capacity = host_capacity
        self.max_bytes = max_bytes
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[str, None] = OrderedDict()  # LOADED adapters, least recent first
        self.loads = 0
        self.failure_counts: dict[str, int] = {}  # refusals and fetch failures by reason, for /metrics
        # key -> (the source's version when refused, the refusal): the same content is refused again
        # without a fetch or a load, for good when it is content-addressed
        self._refused: OrderedDict[str, tuple[object, InvalidAdapterError]] = OrderedDict()
        self._checked: dict[str, tuple[object, bool]] = {}  # local adapters: key -> (version, header check ok)

    @property
    def num_loaded(self) -> int:
        return len(self._host)

    def cache_stats(self) -> dict[str, int]:
        """The sources' disk caches, summed (bytes verified and in download, leftovers removed)."""
        out: dict[str, int] = {}
        for source in self.sources:
            for key, value in source.cache_stats().items():
                out[key] = out.get(key, 0) + value
        return out

    async def names(self) -> list[str]:
        """Every adapter the sources list, less those that would be refused: refused before (until
        their content changes), or, for adapters on local disk, failing the checks that need no
        tensor values (`check_adapter`, cached per version). A request may name more (any CID, any
        name or id the on-chain registry knows)."""
        out: list[str] = []
        checked: dict[str, tuple[object, bool]] = {}
        for source in self.sources:
            for name in source.names():
                if name not in out and await self._listable(source, name, checked):
                    out.append(name)
        self._checked = checked
        return out

    async def _listable(self, source: AdapterSource, name: str, checked: dict[str, tuple[object, bool]]) -> bool:
        key = await source.canonical(name)
        if key is None:
            return False
        version = source.version(name)
        if key in self._refused and self._refused[key][0] == version:
            return False
        path = source.local_path(name)
        if path is None:
            return True
        known = self._checked.get(key)
        if known is None or known[0] != version:
            try:
                check_adapter(path, key, self.base, self.max_rank, max_bytes=self.max_bytes)
                known = (version, True)
            except (InvalidAdapterError, OSError):
                known = (version, False)
        checked[key] = known
        return known[1]

    async def resolve(self, name: str) -> tuple[AdapterSource, str] | None:
        """The first source (in configured order) that knows `name`, and the adapter's identity
        there; None if none does. AdapterUnavailableError when a source cannot tell now."""
        for source in self.sources:
            key = await source.canonical(name)
            if key is not None:
                return source, key
        return None

    async def known_locally(self, name: str) -> bool:
        """Whether a source on this machine's disk (not content-addressed: no fetch, no chain read) has `name`."""
        for source in self.sources:
            if not source.content_addressed and await source.canonical(name) is not None:
                return True
        return False

    def resident(self, key: str) -> bool:
        """Whether the adapter `key` is validated in host memory now (acquiring it costs no fetch, no load)."""
        return key in self._host

    async def state(self, name: str) -> AdapterState | None:
        found = await self.resolve(name)
        entry = self._entries.get(found[1]) if found else None
        return entry.state if entry else None

    async def acquire(self, name: str) -> LoraAdapter:
        """The validated adapter in host memory, loading it first if needed. Pair with `release`.
        Raises LookupError for an unknown name."""
        found = await self.resolve(name)
        if found is None:
            raise LookupError(name)
        source, key = found
        entry = self._entries.get(key)
        if entry is None or (entry.state is AdapterState.FAILED and entry.loading is None):
            refusal = self._refused.get(key)
            if refusal is not None and refusal[0] == source.version(key):
                raise refusal[1]  # refused before and unchanged since: it would be refused again
        if entry is None:
            entry = self._entries[key] = _Entry(key, source)
        while entry.adapter is None:
            if entry.loading is None:
                if entry.state is AdapterState.FAILED and self.clock() < entry.retry_at:
                    raise entry.error
                entry.loading = asyncio.ensure_future(self._load(entry))
            await asyncio.shield(entry.loading)  # one waiter leaving must not cancel the shared load
        entry.refs += 1
        self._host.move_to_end(key)
        return entry.adapter

    def release(self, adapter: LoraAdapter) -> None:
        entry = self._entries[adapter.name]
        entry.refs -= 1
        self._trim_host()

    async def _load(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        fetched = False
        try:
            entry.state = AdapterState.FETCHING
            path = await entry.source.fetch(entry.name)
            fetched = True
            entry.state = AdapterState.VERIFIED
            load = functools.partial(load_adapter, path, entry.name, self.base, self.max_rank, max_bytes=self.max_bytes)
            # a fresh thread per load: its OpenMP pool, if any, ends with it (node.threads)
            adapter = await loop.run_in_executor(None, run_in_fresh_thread, load)
            adapter.cid = entry.name if entry.source.content_addressed else None
            await loop.run_in_executor(None, entry.source.accepted, entry.name)
        except (InvalidAdapterError, AdapterUnavailableError, AdapterNotFoundError) as exc:
            if isinstance(exc, InvalidAdapterError):
                self._refused[entry.name] = (entry.source.version(entry.name), exc)
                while len(self._refused) > MAX_REMEMBERED_REFUSALS:
                    self._refused.popitem(last=False)
                if fetched:
                    await loop.run_in_executor(None, entry.source.refused, entry.name)
            self._forget_stale_failures()
            entry.failures += 1
            self.failure_counts[exc.reason] = self.failure_counts.get(exc.reason, 0) + 1
            entry.state, entry.error = AdapterState.FAILED, exc
            entry.retry_at = self.clock() + min(self.max_backoff_s, self.retry_backoff_s * 2 ** (entry.failures - 1))
            log.warning("adapter %s failed: %s", entry.name, exc)
            raise
        finally:
            entry.loading = None
        entry.adapter, entry.state, entry.error, entry.failures = adapter, AdapterState.LOADED, None, 0
        self._refused.pop(entry.name, None)
        self._host[entry.name] = None
        self.loads += 1
        self._trim_host(keep=entry.name)  # its waiters have not taken their references yet

    def _forget_stale_failures(self) -> None:
        """Failed entries whose backoff has passed are dropped, so that clients naming endless
        bogus CIDs cannot grow this table without bound (a retry simply starts afresh)."""
        now = self.clock()
        for key in [k for k, e in self._entries.items() if e.state is AdapterState.FAILED and e.retry_at <= now]:
            if self._entries[key].loading is None and self._entries[key].refs == 0:
                del self._entries[key]

    def _trim_host(self, keep: str | None = None) -> None:
        excess = len(self._host) - self.host_capacity
        for name in list(self._host):
            if excess <= 0:
                break
            entry = self._entries[name]
            if entry.refs == 0 and name != keep:
                del self._host[name]
                entry.adapter, entry.state = None, AdapterState.VERIFIED
                excess -= 1
