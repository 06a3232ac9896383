"""The bucket bounding public lookups of new model names, on a clock the test moves."""

from __future__ import annotations

import pytest

from node.api.lookups import LookupLimiter, PayerLookups, RateLimitedError


def anything(key: str) -> bool:
    return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_at_the_rate() -> None:
    clock = Clock()
    limiter = LookupLimiter(2.0, remember=60, clock=clock)  # burst 8
    for i in range(8):
        limiter.admit(f"n{i}", anything)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("n8", anything)
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    clock.now += 0.49  # 0.98 of a token: still refused
    with pytest.raises(RateLimitedError):
        limiter.admit("n8", anything)
    clock.now += 0.01
    limiter.admit("n8", anything)
    with pytest.raises(RateLimitedError):
        limiter.admit("n9", anything)
    clock.now += 1000  # refills to the burst, not beyond
    for i in range(8):
        limiter.admit(f"m{i}", anything)
    with pytest.raises(RateLimitedError):
        limiter.admit("m8", anything)


def test_names_answered_lately_draw_nothing() -> None:
    clock = Clock()
    limiter = LookupLimiter(0.25, remember=60, clock=clock)  # burst 1
    limiter.admit("sql", anything)
    limiter.answered("sql", "key-sql")
    for _ in range(10):
        limiter.admit("sql", anything)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("other", anything)
    assert info.value.headers == {"Retry-After": "4"}  # one token at 0.25/s
    clock.now += 60  # remembered for 60 s only (and the bucket has refilled meanwhile)
    limiter.admit("sql", anything)
    with pytest.raises(RateLimitedError):
        limiter.admit("sql", anything)


def test_remembered_names_are_bounded() -> None:
    clock = Clock()
    limiter = LookupLimiter(0.001, max_names=2, clock=clock)
    limiter.admit("a", anything)
    for name in ("a", "b", "c"):  # "a" is the oldest: forgotten
        limiter.answered(name, f"key-{name}")
    limiter.admit("b", anything)
    limiter.admit("c", anything)
    with pytest.raises(RateLimitedError):
        limiter.admit("a", anything)


def test_rate_zero_is_no_limit() -> None:
    limiter = LookupLimiter(0)
    for i in range(10_000):
        limiter.admit(f"n{i}", anything)


def test_a_name_whose_adapter_left_host_memory_draws_again() -> None:
    """Answered lately is free only while the adapter is in host memory: otherwise, one token per adapter bought
    endless lookups of more adapters than the node holds, each one reloading (or fetching again) an adapter."""
    clock = Clock()
    limiter = LookupLimiter(0.5, remember=60, clock=clock)  # burst 2
    held = {"key-a"}
    for name in ("a", "b"):
        limiter.admit(name, held.__contains__)
        limiter.answered(name, f"key-{name}")
    for _ in range(5):
        limiter.admit("a", held.__contains__)  # in host memory: free
    with pytest.raises(RateLimitedError):
        limiter.admit("b", held.__contains__)  # answered 0 s ago, but evicted since: a token, and none is left
    held = {"key-b"}
    limiter.admit("b", held.__contains__)
    with pytest.raises(RateLimitedError):
        limiter.admit("a", held.__contains__)


def test_each_payer_has_a_bucket_and_the_most_recent_are_kept() -> None:
    clock = Clock()
    payers = PayerLookups(0.25, max_payers=2, clock=clock)  # burst 1 each
    payers.of("0xA").admit("n", anything)
    with pytest.raises(RateLimitedError):
        payers.of("0xA").admit("m", anything)
    payers.of("0xB").admit("m", anything)  # another payer: its own bucket
    assert payers.of("0xA") is payers.of("0xA")
    payers.of("0xC")  # three payers, room for two: B, the least recently active, is dropped
    with pytest.raises(RateLimitedError):
        payers.of("0xA").admit("m", anything)  # A was kept, still empty
    payers.of("0xB").admit("m", anything)  # B starts again with a full bucket
