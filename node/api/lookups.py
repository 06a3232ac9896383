"""A bound on what anyone can make the node look up: `GET /v1/models/<name>` is public and unauthenticated,
yet a name it has not seen can cost an AdapterRegistry read (the operator's RPC quota) and a CID an IPFS
fetch, verification and validation of up to `max_adapter_bytes`. A flood of fresh names would spend those
for nothing; a paid request goes through the signed-request checks first (`node/api/accounting.py`).

Lookups of names not answered in the last `remember` seconds draw from one token bucket for the node
(`lookups_per_s`, burst four times that); a name answered recently (a dApp polling its adapter's card) draws
nothing. An empty bucket answers 429 `rate_limit_exceeded` with `Retry-After`. The bucket is global, not per
client address, because what it protects (RPC quota, bandwidth, CPU) is the node's whatever the caller's
address, and addresses are cheap to change.
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
        self._answered: OrderedDict[str, float] = OrderedDict()  # name -> when it was last answered

    def admit(self, name: str) -> None:
        """Lets the lookup of `name` go ahead, or raises `RateLimitedError`."""
        if self.rate <= 0:
            return
        now = self.clock()
        answered = self._answered.get(name)
        if answered is not None and now - answered < self.remember:
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

    def answered(self, name: str) -> None:
        """`name` was found and answered: its lookups draw nothing for the next `remember` seconds."""
        self._answered[name] = self.clock()
        self._answered.move_to_end(name)
        while len(self._answered) > self.max_names:
            self._answered.popitem(last=False)
