"""How the torch (CPU) path groups a step's LoRA tokens: long segments one by one, short ones packed.

Measured on the 2-core dev machine with SmolLM2 shapes (docs/kernels.md): a Python loop over
adapters costs ~3 us per op in fp32 (~20 us per oneDNN op in bf16), ~25 us per adapter and
projection group, so decode tokens on many adapters are packed into one batched matmul that
reads the adapters of a dense slot range in place. Long segments (prefill) keep a plain matmul
each: there the work per adapter dwarfs the per-op cost and no padding is wasted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Segments with at least this many tokens get a matmul of their own; shorter ones are batched.
# Packing pads every block to the longest short segment, so the cap also caps the padding.
LONG_SEGMENT = 8


@dataclass(frozen=True)
class Segment:
    """One adapter's tokens: a slice when they are contiguous in the batch (a prefill chunk)."""

    slot: int
    rows: slice | torch.Tensor  # slice, or [c] int64 token indices


@dataclass(frozen=True)
class PaddedGroup:
    """Short segments packed into P blocks of `width` rows each, one block per slot.

    Worked example, T = 6 and width 2: slot 3 has token [5], slot 4 tokens [0, 2], slot 6
    token [1]. The slots span 3..6, dense enough to read A[3:7] in place (P = 4, slot 5 is an
    idle block); `fill` names the x row of each padded row, T (= 6) being an all-zero row:

        slots  3:7          fill   [5, 6, 0, 2, 6, 6, 1, 6]
        tokens [5, 0, 2, 1]  rows   [0, 2, 3, 6]
    """

    slots: slice | torch.Tensor  # which slots the blocks read: a range, or [P] int64 indices
    block_slots: torch.Tensor  # [P] int64: slot of each block (for ranks and scales)
    host_block_slots: tuple[int, ...]
    width: int  # rows per block: the longest packed segment
    fill: torch.Tensor  # [P * width] int64: x row of each padded row, T = a zero row
    dense: bool  # every padded row is a real token: no zero row needed
    tokens: torch.Tensor  # [L] int64: the packed tokens
    rows: torch.Tensor  # [L] int64: their padded row


@dataclass(frozen=True)
class TorchPlan:
    """A step's LoRA segments, long and short; the short ones also packed (built on first use).
    The reference loops over the short segments too when there are few or they are scattered."""

    long: tuple[Segment, ...]
    short: tuple[Segment, ...]
    short_ids: tuple[tuple[int, torch.Tensor], ...]  # (slot, [c] int64 host token indices), by slot
    num_tokens: int
    device: torch.device

    @cached_property
    def packed(self) -> PaddedGroup:
        return _pack(list(self.short_ids), self.num_tokens, self.device)


def build_torch_plan(
    slot_ids: tuple[int, ...], starts: tuple[int, ...], sorted_ids: torch.Tensor, device: torch.device
) -> TorchPlan:
    """Sort a step's LoRA segments into long and short ones.

    sorted_ids: [T] LoraMeta.sorted_token_ids on the host; the plan's index tensors go to `device`.
    """
    sorted_ids = sorted_ids.to(torch.int64)
    long, short, short_ids = [], [], []
    for slot, lo, hi in zip(slot_ids, starts, starts[1:]):
        if slot < 0:
            continue
        ids = sorted_ids[lo:hi]
        first, last = int(ids[0]), int(ids[-1])
        # ids ascend inside a segment, so they are contiguous exactly when last - first == count - 1
        rows = slice(first, last + 1) if last - first == hi - lo - 1 else ids.to(device)
        if hi - lo >= LONG_SEGMENT:
            long.append(Segment(slot, rows))
        else:
            short.append(Segment(slot, rows))
            short_ids.append((slot, ids))
    return TorchPlan(tuple(long), tuple(short), tuple(short_ids), sorted_ids.numel(), device)


def _pack(short: list[tuple[int, torch.Tensor]], num_tokens: int, device: torch.device) -> PaddedGroup:
    width = max(ids.numel() for _, ids in short)
    lo, hi = short[0][0], short[-1][0]
    if hi - lo + 1 <= 2 * len(short):
        # Dense range: read the weights in place; idle slots in between cost a zero block each,
        # no more than the copy that an index_select of the used slots would make.
        slots: slice | torch.Tensor = slice(lo, hi + 1)
        block_slots = torch.arange(lo, hi + 1)
        block_of = {slot: slot - lo for slot, _ in short}
    else:
        block_slots = torch.tensor([slot for slot, _ in short])
        slots = block_slots
        block_of = {slot: i for i, (slot, _) in enumerate(short)}
    fill = torch.full((block_slots.numel() * width,), num_tokens, dtype=torch.int64)
    tokens = torch.cat([ids for _, ids in short])
    rows = torch.cat([block_of[slot] * width + torch.arange(ids.numel()) for slot, ids in short])
    fill[rows] = tokens
    return PaddedGroup(
        slots=slots if isinstance(slots, slice) else slots.to(device),
        block_slots=block_slots.to(device),
        host_block_slots=tuple(block_slots.tolist()),
        width=width,
        fill=fill.to(device),
        dense=tokens.numel() == fill.numel(),
        tokens=tokens.to(device),
        rows=rows.to(device),
    )
