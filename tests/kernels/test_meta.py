"""build_lora_meta: the sorted segment layout of the docstring's worked example, and its edges."""

from __future__ import annotations

import pytest
import torch

from kernels import build_lora_meta
from kernels.plan import LONG_SEGMENT


def test_worked_example() -> None:
    # 18 tokens in batch order: 10 on slot 0, 5 on slot 2, 3 base-only, interleaved
    slots = [0, -1, 2, 0, 0, 2, -1, 0, 0, 0, 2, 0, 0, -1, 2, 0, 2, 0]
    meta = build_lora_meta(torch.tensor(slots))
    assert meta.slot_ids.tolist() == [-1, 0, 2]
    assert meta.counts.tolist() == [3, 10, 5]
    assert meta.starts.tolist() == [0, 3, 13, 18]
    order = meta.sorted_token_ids.tolist()
    assert order[:3] == [1, 6, 13]  # base-only first, batch order kept inside a segment
    assert order[3:13] == [i for i, s in enumerate(slots) if s == 0]
    assert order[13:] == [i for i, s in enumerate(slots) if s == 2]
    assert (meta.num_lora_tokens, meta.max_lora_segment, meta.num_segments) == (15, 10, 3)
    assert meta.host_slot_ids == (-1, 0, 2) and meta.host_starts == (0, 3, 13, 18)
    for tensor in (meta.token_slots, meta.sorted_token_ids, meta.slot_ids, meta.counts, meta.starts):
        assert tensor.dtype == torch.int32
    assert meta.has_lora and meta.is_decode


@pytest.mark.parametrize("slots", [[], [-1], [-1] * 7])
def test_base_only_and_empty(slots: list[int]) -> None:
    meta = build_lora_meta(torch.tensor(slots, dtype=torch.int64))
    assert not meta.has_lora
    assert meta.num_tokens == len(slots) and meta.max_lora_segment == 0
    assert meta.starts.tolist()[-1] == len(slots)


def test_prefill_like_is_not_decode() -> None:
    meta = build_lora_meta(torch.tensor([3] * 40 + [-1] * 4 + [1]))
    assert not meta.is_decode and meta.max_lora_segment == 40


@pytest.mark.parametrize("bad", [torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]), torch.tensor([0, -2])])
def test_rejects_bad_slots(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        build_lora_meta(bad)


def test_torch_plan_sorts_long_and_short_segments() -> None:
    long_run = [5] * LONG_SEGMENT  # a prefill chunk: contiguous -> a slice
    split = [7] * 4 + [-1] + [7] * (LONG_SEGMENT - 4)  # one adapter, rows not contiguous -> indices
    slots = long_run + split + [0, 2, 2, 3]
    plan = build_lora_meta(torch.tensor(slots)).torch_plan
    rows = {seg.slot: seg.rows for seg in plan.long}
    assert rows.keys() == {5, 7}
    assert rows[5] == slice(0, LONG_SEGMENT)
    n = LONG_SEGMENT
    assert rows[7].tolist() == list(range(n, n + 4)) + list(range(n + 5, 2 * n + 1))
    first, T = 2 * n + 1, len(slots)
    assert [(seg.slot, seg.rows) for seg in plan.short] == [
        (0, slice(first, first + 1)),
        (2, slice(first + 1, first + 3)),
        (3, slice(first + 3, first + 4)),
    ]

    packed = plan.packed
    assert packed.slots == slice(0, 4)  # slots 0..3 are dense: read in place
    assert packed.width == 2 and packed.host_block_slots == (0, 1, 2, 3)
    # blocks of 2 rows for slots 0, 1 (idle), 2, 3; T marks a padding row
    assert packed.fill.tolist() == [first, T, T, T, first + 1, first + 2, first + 3, T]
    assert not packed.dense


def test_torch_plan_gathers_scattered_slots() -> None:
    packed = build_lora_meta(torch.tensor([40, 3, 90])).torch_plan.packed
    assert packed.slots.tolist() == [3, 40, 90]
    assert packed.fill.tolist() == [1, 0, 2] and packed.dense
