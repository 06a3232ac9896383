"""A bound on what anyone can make the node look up: `GET /v1/models/<name>` is public and unauthenticated,
yet a name it has not seen can cost an AdapterRegistry read (the operator's RPC quota) and a CID an IPFS
fetch, verification and validation of up to `max_adapter_bytes`. A flood of fresh names would spend those
for nothing; a paid request goes through the signed-request checks first (`node/api/accounting.py`).

Lookups draw from one token bucket for the node (`lookups_per_s`, burst four times that), except those that
cost no network and no load: names of adapters on this machine's disk (the operator's directory), and a name
answered in the last `remember` seconds whose adapter is still in host memory (a dApp polling its adapter's
card). A name answered lately whose adapter has left host memory draws again: otherwise anyone could have the
node answer more adapters than it holds, in turn, each lookup reloading (or fetching again) one of them, for
the price of one token per adapter. Free generation requests (unsigned, on a node that serves them) naming an
adapter go through the same bucket (`node/api/generation.py`): they resolve and fetch names just the same.

An empty bucket answers 429 `rate_limit_exceeded` with `Retry-After`. The bucket is global, not per client
address, because what it protects (RPC quota, bandwidth, CPU) is the node's whatever the caller's address,
and addresses are cheap to change.

Signed requests pass the signature and escrow checks before their name is resolved, but a payer with one wei
of escrow here passes them too (`maxCharge` 1), and could then name fresh registry names without end, each
refused only after a registry read. Each payer therefore has a bucket of its own (`PayerLookups`, the same
rate): a payer is an escrow account with this node, which takes a deposit to make, and one payer's flood
neither spends another payer's lookups nor the public bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from node.api.errors import APIError


class RateLimitedError(APIError):
    status = 429
    type = "requests"  # what OpenAI answers a rate limit with
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}


class LookupLimiter:
    """A token bucket for lookups of names not answered recently. `rate` 0: no limit."""

    def __init__(
        self, rate: float, *, remember: float = 60.0, max_names: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, 4 * rate)
        self.remember = remember
        self.max_names = max_names
        self.clock = clock
        self._tokens = self.burst
        self._filled_at = clock()
        # name -> (when it was last answered, its adapter's key then)
        self._answered: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def admit(self, name: str, resident: Callable[[str], bool]) -> None:
        """Lets the lookup of `name` go ahead, or raises `RateLimitedError`. Free when `name` was answered in
        the last `remember` seconds and `resident(its key)` says its adapter is still in host memory."""
        if self.rate <= 0:
            return
        now = self.clock()
        answered = self._answered.get(name)
        if answered is not None and now - answered[0] < self.remember and resident(answered[1]):
            return
        self._tokens = min(self.burst, self._tokens + (now - self._filled_at) * self.rate)
        self._filled_at = now
        if self._tokens < 1:
            wait = (1 - self._tokens) / self.rate
            raise RateLimitedError(
                f"Too many lookups of new model names; retry in {wait:.1f} s (this node allows {self.rate:g} per second).",
                wait,
            )
        self._tokens -= 1

    def answered(self, name: str, key: str) -> None:
        """`name` was found as the adapter `key` and answered: for the next `remember` seconds its lookups draw
        nothing while that adapter stays in host memory."""
        self._answered[name] = (self.clock(), key)
        self._answered.move_to_end(name)
        while len(self._answered) > self.max_names:
            self._answered.popitem(last=False)


class PayerLookups:
    """One `LookupLimiter` per payer (signed requests), the `max_payers` most recently active kept."""

    def __init__(self, rate: float, *, max_payers: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.max_payers = max_payers
        self.clock = clock
        self._limiters: OrderedDict[str, LookupLimiter] = OrderedDict()

    def of(self, payer: str) -> LookupLimiter:
        limiter = self._limiters.get(payer)
        if limiter is None:
            limiter = self._limiters[payer] = LookupLimiter(self.rate, max_names=256, clock=self.clock)
        self._limiters.move_to_end(payer)
        while len(self._limiters) > self.max_payers:
            self._limiters.popitem(last=False)
        return limiter
