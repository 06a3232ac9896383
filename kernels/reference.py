"""Torch multi-LoRA ops: the CPU path, and the oracle the Triton kernels are tested against.

Same signatures and semantics as the kernels; the work follows `meta.torch_plan`, built once per
step (docs/kernels.md has the measurements behind each choice):

- long segments (prefill chunks), and the short ones when there are few or their slots are
  scattered: a matmul per segment, updating y's rows in place when they are contiguous.
- otherwise the short segments (decode tokens) are padded into one block per slot and run as one
  `torch.bmm` per op, reading the weights of a dense slot range in place (a view, no copy).

Accumulation is fp32 inside the matmuls; in half precision t is rounded to the weight dtype
before the expand, as any half-precision GEMM does. shrink_expand keeps t in each path's own layout
instead of scattering it into [T, n, R] and gathering it back.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from kernels.checks import check_add, check_expand, check_shrink
from kernels.meta import LoraMeta
from kernels.plan import LONG_SEGMENT, PaddedGroup, Segment, TorchPlan

FEW_SHORT_FP32 = 8
FEW_SHORT_HALF = 2


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: torch.Tensor) -> torch.Tensor:
    """Semantics: t[t, i, :rank[s]] = x[t] @ A[s, i, :rank[s]].T  for s = slot[t] >= 0; all else 0.

    x:      [T, H_in] fp32/bf16/fp16 activations.
    A:      [S, n_slices, R, H_in] stacked LoRA A of all slots, same dtype as x.
    meta:   the step's LoraMeta (from build_lora_meta).
    ranks:  [S] int32, rank of each slot (<= R).
    returns t: [T, n_slices, R] float32; base-only tokens and columns beyond a slot's rank are 0.
    """
    T, n, R, H = check_shrink(x, A, meta, ranks)
    t = torch.zeros((T, n, R), dtype=torch.float32, device=x.device)
    if not meta.has_lora:
        return t
    plan, rank = meta.torch_plan, ranks.tolist()
    batched = _batched(x, plan)
    for seg in plan.long if batched else plan.long + plan.short:
        r = rank[seg.slot]
        t[seg.rows, :, :r] = _segment_shrink(x, A, seg, r).float()
    if batched:
        packed, r = plan.packed, _packed_rank(rank, plan)
        tp = _packed_shrink(x, A, packed, r) * _rank_mask(ranks, packed.block_slots, r).view(-1, 1, r, 1)
        t[packed.tokens, :, :r] = tp.permute(0, 3, 1, 2).reshape(-1, n, r)[packed.rows].float()
    return t


def lora_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
) -> None:
    """Semantics: y[t, o_i:o_i+1] += scale[s] * t[t, i, :rank[s]] @ B[s, o_i:o_i+1, :rank[s]].T  for s = slot[t] >= 0.

    y:       [T, N_total] fp32/bf16/fp16, updated in place.
    t:       [T, n_slices, R] float32 (lora_shrink's output).
    B:       [S, N_total, R] stacked LoRA B of all slots, same dtype as y.
    meta:    the step's LoraMeta.
    scales:  [S] float32 per-slot scale (alpha / r, or rsLoRA's alpha / sqrt(r)).
    ranks:   [S] int32 per-slot rank (<= R).
    slice_offsets: n_slices + 1 ints, 0 = o_0 < o_1 < ... = N_total: output rows of each slice.
    """
    T, n, R, N = check_expand(y, t, B, meta, scales, ranks, slice_offsets)
    if not meta.has_lora:
        return
    plan, rank, scale = meta.torch_plan, ranks.tolist(), scales.tolist()
    offsets = tuple(slice_offsets)
    batched = _batched(y, plan)
    for seg in plan.long if batched else plan.long + plan.short:
        r = rank[seg.slot]
        _segment_expand(y, t[seg.rows, :, :r].to(y.dtype), B, seg, r, scale[seg.slot], offsets)
    if batched:
        packed, r = plan.packed, _packed_rank(rank, plan)
        P, c = packed.block_slots.numel(), packed.width
        src = t.view(T, n * R) if packed.dense else F.pad(t.view(T, n * R), (0, 0, 0, 1))  # + a zero row
        tp = src.index_select(0, packed.fill).view(P, c, n, R)[..., :r].permute(0, 2, 3, 1)  # [P, n, r, c]
        tp = tp * _coef(scales, ranks, packed.block_slots, r).view(P, 1, r, 1)
        _packed_expand(y, tp, B, packed, r, offsets)


def shrink_expand(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
    meta: LoraMeta,
) -> None:
    """Semantics: y[t, o_i:o_i+1] += scale[s] * (x[t] @ A[s, i, :rank[s]].T) @ B[s, o_i:o_i+1, :rank[s]].T.

    lora_shrink then lora_expand for one projection group, shapes as there, with t kept in the
    plan's layout. Returns at once when the step has no LoRA token.
    """
    if not meta.has_lora:
        return
    check_add(y, x, A, B, scales, ranks, slice_offsets, meta)
    plan, rank, scale = meta.torch_plan, ranks.tolist(), scales.tolist()
    offsets = tuple(slice_offsets)
    batched = _batched(x, plan)
    for seg in plan.long if batched else plan.long + plan.short:
        r = rank[seg.slot]
        _segment_expand(y, _segment_shrink(x, A, seg, r), B, seg, r, scale[seg.slot], offsets)
    if batched:
        packed, r = plan.packed, _packed_rank(rank, plan)
        tp = _packed_shrink(x, A, packed, r) * _coef(scales, ranks, packed.block_slots, r).view(-1, 1, r, 1)
        _packed_expand(y, tp, B, packed, r, offsets)


# ---- one segment: a plain matmul -----------------------------------------------------------------


def _segment_shrink(x: torch.Tensor, A: torch.Tensor, seg: Segment, r: int) -> torch.Tensor:
    """[c, n, r]: the segment's rows of x times each slice of its slot's A, up to rank r."""
    xs = x[seg.rows] if isinstance(seg.rows, slice) else x.index_select(0, seg.rows)
    _, n, R, H = A.shape
    if r == R:  # all slices in one matmul against a view of the slot's A
        return (xs @ A[seg.slot].view(n * R, H).T).view(-1, n, R)
    return torch.matmul(xs, A[seg.slot, :, :r].transpose(1, 2)).transpose(0, 1)  # [c, H] @ [n, H, r]


def _segment_expand(
    y: torch.Tensor,
    ts: torch.Tensor,
    B: torch.Tensor,
    seg: Segment,
    r: int,
    scale: float,
    slice_offsets: tuple[int, ...],
) -> None:
    """y[rows, slice i] += scale * ts[:, i] @ B[slot, slice i, :r].T  (ts: [c, n, r] in y's dtype)."""
    c, n, _ = ts.shape
    Bs = B[seg.slot, :, :r]
    contiguous = isinstance(seg.rows, slice)
    if c < LONG_SEGMENT and n > 1:
        # decode-sized: one matmul of every slice's t against all of B's rows (n x the FLOPs,
        # still tiny), then keep each output row's own slice: 3 ops instead of one per slice
        N = y.shape[1]
        full = (ts.reshape(c * n, r) @ Bs.T).view(c, n, N)
        d = full.gather(1, _slice_of_row(slice_offsets, y.device).view(1, 1, N).expand(c, 1, N)).view(c, N)
    elif contiguous:  # a prefill chunk: update y's rows in place, slice by slice
        for i, (lo, hi) in enumerate(zip(slice_offsets, slice_offsets[1:])):
            y[seg.rows, lo:hi].addmm_(ts[:, i], Bs[lo:hi].T, alpha=scale)
        return
    else:
        d = torch.cat([ts[:, i] @ Bs[lo:hi].T for i, (lo, hi) in enumerate(zip(slice_offsets, slice_offsets[1:]))], 1)
    if contiguous:
        y[seg.rows].add_(d, alpha=scale)
    else:
        y.index_add_(0, seg.rows, d, alpha=scale)


# ---- short segments, batched: padded blocks, one bmm -----------------------------------------------


def _batched(tensor: torch.Tensor, plan: TorchPlan) -> bool:
    """Whether the short segments run as one padded batch (else a matmul each, like the long).

    Measured with SmolLM2 shapes (docs/kernels.md): few short segments run faster one by one, up
    to 8 in fp32 (~3 us per op) but only 2 in half precision (~20 us per oneDNN op). In fp32 the
    batch also needs dense slots: it reads every slot of the range, and over a range with more
    than a quarter idle the loop wins (and beats gathering the weights of a scattered set).
    """
    if tensor.dtype != torch.float32:
        return len(plan.short) > FEW_SHORT_HALF
    if len(plan.short) <= FEW_SHORT_FP32:
        return False
    packed = plan.packed
    return isinstance(packed.slots, slice) and 4 * packed.block_slots.numel() <= 5 * len(plan.short)


def _packed_rank(rank: list[int], plan: TorchPlan) -> int:
    return max(rank[s] for s in plan.packed.host_block_slots)


def _slots(W: torch.Tensor, group: PaddedGroup) -> torch.Tensor:
    """The group's slots of a stacked weight: a view for a dense range, a gather otherwise."""
    return W[group.slots] if isinstance(group.slots, slice) else W.index_select(0, group.slots)


def _packed_shrink(x: torch.Tensor, A: torch.Tensor, group: PaddedGroup, r: int) -> torch.Tensor:
    """[P, n, r, width]: each block's slot's A, up to rank r, times the block's padded rows of x."""
    H = x.shape[1]
    P, n, R, c = group.block_slots.numel(), A.shape[1], A.shape[2], group.width
    src = x if group.dense else F.pad(x, (0, 0, 0, 1))  # row T: the zero row of padding
    xp = src.index_select(0, group.fill).view(P, c, H).transpose(1, 2)  # [P, H, width]
    if r == R:  # one [n * R, H] matrix per slot: a view of a dense range, no copy
        return torch.bmm(_slots(A, group).view(P, n * R, H), xp).view(P, n, R, c)
    # rank-sliced slices are no longer one matrix per slot; batch over (slot, slice) instead
    Ap = _slots(A[:, :, :r], group).reshape(P * n, r, H)  # still a view: slot and slice dims merge
    return torch.bmm(Ap, xp.unsqueeze(1).expand(P, n, H, c).reshape(P * n, H, c)).view(P, n, r, c)


def _packed_expand(
    y: torch.Tensor, tp: torch.Tensor, B: torch.Tensor, group: PaddedGroup, r: int, slice_offsets: tuple[int, ...]
) -> None:
    """y[tokens] += each block's tp times its slot's B  (tp: [P, n, r, width], scaled and masked)."""
    P, n, _, c = tp.shape
    N = y.shape[1]
    tq = tp.to(y.dtype).transpose(1, 2).reshape(P, r, n * c)
    # One bmm against all of each slot's B rows for every slice's t (n x the FLOPs of the useful
    # part, but one pass over B, which is what decode is bound by), then keep each row's slice.
    full = torch.bmm(_slots(B[:, :, :r], group), tq).view(P, N, n, c)
    d = torch.cat([full[:, lo:hi, i] for i, (lo, hi) in enumerate(zip(slice_offsets, slice_offsets[1:]))], 1)
    d = d.transpose(1, 2).reshape(P * c, N)  # [P * width, N]
    if group.dense:
        y.index_add_(0, group.fill, d)
    else:
        y.index_add_(0, group.tokens, d.index_select(0, group.rows))


# ---- shared ----------------------------------------------------------------------------------------


def _rank_mask(ranks: torch.Tensor, slots: torch.Tensor, r: int) -> torch.Tensor:
    """[len(slots), r] bool: column j is inside the slot's rank."""
    return torch.arange(r, device=ranks.device) < ranks[slots].view(-1, 1)


def _coef(scales: torch.Tensor, ranks: torch.Tensor, slots: torch.Tensor, r: int) -> torch.Tensor:
    """[len(slots), r]: scale and rank mask in one factor, scale[s] * (j < rank[s])."""
    return scales[slots].view(-1, 1) * _rank_mask(ranks, slots, r)


@lru_cache(maxsize=64)
def _slice_of_row(slice_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[N_total] int64: which slice each output row belongs to."""
    sizes = torch.tensor([b - a for a, b in zip(slice_offsets, slice_offsets[1:])])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)
