"""The bucket bounding public lookups of new model names, on a clock the test moves."""

from __future__ import annotations

import pytest

from node.api.lookups import LookupLimiter, RateLimitedError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_at_the_rate() -> None:
    clock = Clock()
    limiter = LookupLimiter(2.0, remember=60, clock=clock)  # burst 8
    for i in range(8):
        limiter.admit(f"n{i}")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("n8")
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    clock.now += 0.49  # 0.98 of a token: still refused
    with pytest.raises(RateLimitedError):
        limiter.admit("n8")
    clock.now += 0.01
    limiter.admit("n8")
    with pytest.raises(RateLimitedError):
        limiter.admit("n9")
    clock.now += 1000  # refills to the burst, not beyond
    for i in range(8):
        limiter.admit(f"m{i}")
    with pytest.raises(RateLimitedError):
        limiter.admit("m8")


def test_names_answered_lately_draw_nothing() -> None:
    clock = Clock()
    limiter = LookupLimiter(0.25, remember=60, clock=clock)  # burst 1
    limiter.admit("sql")
    limiter.answered("sql")
    for _ in range(10):
        limiter.admit("sql")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("other")
    assert info.value.headers == {"Retry-After": "4"}  # one token at 0.25/s
    clock.now += 60  # remembered for 60 s only (and the bucket has refilled meanwhile)
    limiter.admit("sql")
    with pytest.raises(RateLimitedError):
        limiter.admit("sql")


def test_remembered_names_are_bounded() -> None:
    clock = Clock()
    limiter = LookupLimiter(0.001, max_names=2, clock=clock)
    limiter.admit("a")
    for name in ("a", "b", "c"):  # "a" is the oldest: forgotten
        limiter.answered(name)
    limiter.admit("b")
    limiter.admit("c")
    with pytest.raises(RateLimitedError):
        limiter.admit("a")


def test_rate_zero_is_no_limit() -> None:
    limiter = LookupLimiter(0)
    for i in range(10_000):
        limiter.admit(f"n{i}")
