"""The chain reads a node makes to authorise requests, cached for a short time.

A request must not wait on several RPC round trips, and thousands of requests a second from one payer must
not become thousands of identical reads; the state these reads see changes slowly (deposits, signer changes
and terms versions). Entries live `ttl` seconds (2 s by default), so a withdrawal request or a signer
revocation is seen within `ttl` — well inside the protocol's margins (the thaw and notice periods exceed the
maximum request lifetime plus the commit delay). Escrow is counted as balance minus thawing: thawing funds may
leave before the node commits, so it never serves against them.

When the chain cannot be read, a value read within the last `max_stale` seconds (60 by default) is used
instead: serving goes on through a short RPC outage. That is safe because what these reads guard moves
slowly and only in the node's favour within that time: escrow leaves an account only by a withdrawal that
thawed for `thawPeriod` (far longer), a revocation takes `noticePeriod`, a terms change `noticePeriod`,
and the node's own uncommitted charges are counted from its journal, not from the chain.

Except one move: this node's own commit takes its charges from the accounts, and the journal stops counting
them as uncommitted right then, while a balance read before the commit is cached for up to `ttl` seconds
(`max_stale` through an outage). In between, the same charge would be in neither, and a payer could be served
it again beyond its escrow (the node's stake covering the shortfall at the next commit). So the submitter
reports what each commit took (`collected`) before the journal marks it committed, and an account's value
read before that report is lowered by it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from attribution.checks import SignerStatus, Terms
from attribution.errors import ChainError, ContractRevert

T = TypeVar("T")


class ChainLedger:
    """`attribution.accounting.Ledger` over a deployment's contracts (`attribution.deploy.Contracts`)."""

    def __init__(
        self,
        contracts: Any,
        *,
        ttl: float = 2.0,
        max_stale: float = 60.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.contracts = contracts
        self.ttl = ttl
        self.max_stale = max_stale
        self.max_entries = max_entries
        self.clock = clock
        # key -> (read at, value), least recently used first: past `max_entries` the least recently used entry
        # goes, so reads of many distinct keys (e.g. requests naming unknown adapters) do not evict the escrow
        # and signer entries of payers who keep sending requests.
        self._cache: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
        self.stale_reads = 0  # answers served from an expired entry because the chain could not be read
        # (payer, node), lower case -> [(when reported, amount)]: what this node's commits took from the account
        self._collected: dict[tuple[str, str], list[tuple[float, int]]] = {}
        self._down_until = 0.0  # after a failed read, recent values answer without trying the chain again

    async def _cached(
        self, key: tuple[Any, ...], read: Callable[[], Awaitable[T]], family: tuple[Any, ...] | None = None
    ) -> T:
        """`read()` at most every `ttl` seconds per key. While the chain is unreachable, the last value read
        under `key` (or, for time-keyed reads, under its `family`) within `max_stale` seconds stands in."""
        return (await self._cached_entry(key, read, family))[1]

    async def _cached_entry(
        self, key: tuple[Any, ...], read: Callable[[], Awaitable[T]], family: tuple[Any, ...] | None = None
    ) -> tuple[float, T]:
        """`_cached`, with the time the answer's read began."""
        now = self.clock()
        hit = self._used(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit
        last = hit if hit is not None else self._used(family) if family is not None else None
        usable = last is not None and now - last[0] < self.max_stale
        if usable and now < self._down_until:  # the chain failed a moment ago: don't wait on it again
            self.stale_reads += 1
            return last  # type: ignore[return-value]
        try:
            value = await read()
        except ContractRevert:
            raise
        except Exception as exc:  # connection refused, timeouts, bad gateways: the chain is unreachable
            self._down_until = self.clock() + self.ttl
            if usable:
                self.stale_reads += 1
                return last  # type: ignore[return-value]
            if isinstance(exc, ChainError):
                raise
            raise ChainError(f"cannot read the chain: {type(exc).__name__}") from exc
        self._store(key, (now, value))
        if family is not None:
            self._store(family, (now, value))
        return now, value

    def _used(self, key: tuple[Any, ...]) -> tuple[float, Any] | None:
        """The entry under `key`, now the most recently used; None if there is none."""
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
        return entry

    def _store(self, key: tuple[Any, ...], entry: tuple[float, Any]) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def signer_status(self, payer: str, signer: str) -> SignerStatus | None:
        async def read() -> SignerStatus | None:
            since, until = await self.contracts.escrow._call("signerOf", payer, signer)
            if since == 0 and until == 0:
                return None
            return SignerStatus(since, 0 if until >= 2**64 - 1 else until)

        return await self._cached(("signer", payer, signer), read)

    async def escrow_available(self, payer: str, node: str) -> int:
        """The account's balance minus what is thawing, less what this node's commits took since it was read."""

        async def read() -> int:
            balance, thawing, _ = await self.contracts.escrow._call("accountOf", payer, node)
            return max(balance - thawing, 0)

        read_at, available = await self._cached_entry(("escrow", payer, node), read)
        taken = sum(amount for at, amount in self._collected.get(_account(payer, node), ()) if at >= read_at)
        return max(available - taken, 0)

    def collected(self, node: str, charges: Mapping[str, int]) -> None:
        """A commit of `node`'s, mined, took `charges` (payer -> wei) from the payers' accounts with it: an
        account value read before now is lowered by them. Call it before the journal stops counting those
        charges as uncommitted (module docstring)."""
        now = self.clock()
        for payer, amount in charges.items():
            self._collected.setdefault(_account(payer, node), []).append((now, amount))
        # A report older than `max_stale` predates every value that can still be used: forget it.
        for account in [a for a, taken in self._collected.items() if now - taken[0][0] >= self.max_stale + self.ttl]:
            kept = [(at, amount) for at, amount in self._collected[account] if now - at < self.max_stale + self.ttl]
            if kept:
                self._collected[account] = kept
            else:
                del self._collected[account]

    async def adapter_id(self, cid: str) -> int:
        async def read() -> int:
            return await self.contracts.adapters._call("adapterIdOf", cid)

        adapter_id = await self._cached(("adapter", cid), read)
        if adapter_id == 0:
            raise LookupError(cid)
        return adapter_id

    async def adapter_id_by_name(self, name: str) -> int:
        """The adapter the registry's `name` points to; 0 if none."""

        async def read() -> int:
            return await self.contracts.adapters._call("adapterIdByName", name)

        return await self._cached(("name", name), read)

    async def registered_cid(self, adapter_id: int, at: int) -> str | None:
        """The CID registered under `adapter_id`, None when no adapter has that id or it is retired at `at`
        (unix seconds)."""

        async def read() -> tuple[str, int | None] | None:
            try:
                _, _, cid, count = await self.contracts.adapters._call("adapter", adapter_id)
            except ContractRevert as exc:
                if exc.error == "AdapterRegistryUnknownAdapter":
                    return None
                raise
            since, retired, _, _ = await self.contracts.adapters._call("terms", adapter_id, count - 1)
            return cid, since if retired else None  # a retirement is always the last version

        found = await self._cached(("registered", adapter_id), read)
        if found is None or (found[1] is not None and found[1] <= at):
            return None
        return found[0]

    async def terms(self, adapter_id: int, node: str, at: int) -> Terms:
        """Prices in force at `at` (unix seconds) and the node's fee then. The cache is keyed by the second,
        so a terms version that takes effect is never read early."""

        async def fee() -> int:
            found, fee_per_token = await self.contracts.nodes._call("feeAt", node, at)
            if not found:
                raise ChainError(f"node {node} has no fee in force at {at}: is it registered?")
            return fee_per_token

        fee_per_token = await self._cached(("fee", node, at), fee, family=("fee", node))
        if adapter_id == 0:
            return Terms(0, 0, 0, fee_per_token)

        async def version() -> tuple[int, int, int]:
            found, number, retired, price_in, price_out = await self.contracts.adapters._call(
                "versionAt", adapter_id, at
            )
            if not found or retired:
                raise LookupError(adapter_id)
            return number, price_in, price_out

        number, price_in, price_out = await self._cached(
            ("terms", adapter_id, at), version, family=("terms", adapter_id)
        )
        return Terms(number, price_in, price_out, fee_per_token)


def _account(payer: str, node: str) -> tuple[str, str]:
    return payer.lower(), node.lower()
