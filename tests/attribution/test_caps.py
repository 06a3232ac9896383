"""The cumulativeCap ledger: consecutive disjoint intervals, shared safely by threads and processes,
durable across restarts, raised (never lowered) by a resync, and refusing a corrupt state file."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attribution.caps import UINT128_MAX, CapAccount, CapLedger
from attribution.errors import CapStateError, RequestBuildError
from attribution.types import intervals_overlap

ACCOUNT = CapAccount(31337, "0x" + "ab" * 20, "0x" + "11" * 20, "0x" + "22" * 20)
OTHER_NODE = CapAccount(31337, "0x" + "ab" * 20, "0x" + "11" * 20, "0x" + "33" * 20)


def test_intervals_follow_each_other(tmp_path: Path):
    ledger = CapLedger(tmp_path / "caps.json")
    assert ledger.current(ACCOUNT) == 0
    assert [ledger.allocate(ACCOUNT, m) for m in (5, 1, 7)] == [5, 6, 13]  # (0,5] (5,6] (6,13]
    assert ledger.current(ACCOUNT) == 13
    assert ledger.allocate(OTHER_NODE, 2) == 2  # each (payer, node) has its own counter


def test_the_counter_survives_a_restart(tmp_path: Path):
    path = tmp_path / "state" / "caps.json"  # its directory is created on first use
    CapLedger(path).allocate(ACCOUNT, 40)
    assert CapLedger(path).allocate(ACCOUNT, 2) == 42
    data = json.loads(path.read_text())
    assert data["version"] == 1 and list(data["caps"].values()) == ["42"]  # uint128 as a decimal string
    assert sorted(p.name for p in path.parent.iterdir()) == ["caps.json", "caps.json.lock"]  # no temporary file


def test_resync_takes_the_max(tmp_path: Path):
    ledger = CapLedger(tmp_path / "caps.json")
    ledger.allocate(ACCOUNT, 100)
    assert ledger.observe(ACCOUNT, 60) == 100  # the node has seen less than we signed: keep ours
    assert ledger.observe(ACCOUNT, 100) == 100
    assert ledger.observe(ACCOUNT, 250) == 250  # another device signed more: jump above it
    assert ledger.allocate(ACCOUNT, 10) == 260
    assert CapLedger(tmp_path / "caps.json").current(ACCOUNT) == 260


def test_zero_or_negative_caps_are_refused(tmp_path: Path):
    ledger = CapLedger(tmp_path / "caps.json")
    for bad in (0, -1):
        with pytest.raises(RequestBuildError, match="positive"):
            ledger.allocate(ACCOUNT, bad)
    assert ledger.allocate(ACCOUNT, 1) == 1


def test_the_counter_stops_at_uint128(tmp_path: Path):
    ledger = CapLedger(tmp_path / "caps.json")
    ledger.observe(ACCOUNT, UINT128_MAX - 2)
    assert ledger.allocate(ACCOUNT, 1) == UINT128_MAX - 1
    with pytest.raises(RequestBuildError, match="overflow"):
        ledger.allocate(ACCOUNT, 2)
    assert ledger.allocate(ACCOUNT, 1) == UINT128_MAX  # the refusal changed nothing
    with pytest.raises(RequestBuildError, match="overflow"):
        ledger.allocate(ACCOUNT, 1)


@pytest.mark.parametrize(
    "content", ["{", "[]", '{"version": 2, "caps": {}}', '{"version": 1}', '{"version": 1, "caps": {"k": "x"}}']
)
def test_a_corrupt_state_file_is_refused_not_reset(tmp_path: Path, content: str):
    path = tmp_path / "caps.json"
    path.write_text(content)
    with pytest.raises(CapStateError, match="corrupt.*move it away"):
        CapLedger(path).allocate(ACCOUNT, 1)
    assert path.read_text() == content


def test_an_unwritable_place_is_a_clear_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CapStateError, match="cannot open the cap state lock"):
        CapLedger(blocker / "caps.json").allocate(ACCOUNT, 1)


def _allocate_many(path: str, count: int) -> list[tuple[int, int]]:
    ledger = CapLedger(Path(path))
    intervals = []
    for i in range(count):
        width = 1 + i % 7
        high = ledger.allocate(ACCOUNT, width)
        intervals.append((high - width, high))
    return intervals


def assert_disjoint_and_gapless(intervals: list[tuple[int, int]]) -> None:
    ordered = sorted(intervals)
    for a, b in zip(ordered, ordered[1:]):
        assert not intervals_overlap(a, b), (a, b)
        assert a[1] == b[0], f"gap or overlap between {a} and {b}"
    assert ordered[0][0] == 0


def test_concurrent_threads_get_disjoint_intervals(tmp_path: Path):
    path = str(tmp_path / "caps.json")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(_allocate_many, [path] * 8, [12] * 8))
    intervals = [iv for chunk in results for iv in chunk]
    assert len(intervals) == 96
    assert_disjoint_and_gapless(intervals)


def test_concurrent_processes_get_disjoint_intervals(tmp_path: Path):
    path = str(tmp_path / "caps.json")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_allocate_many, [(path, 20)] * 3)
    intervals = [iv for chunk in results for iv in chunk]
    assert_disjoint_and_gapless(intervals)
    assert CapLedger(Path(path)).current(ACCOUNT) == max(high for _, high in intervals)
