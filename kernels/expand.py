"""Triton LoRA expand: y[t, slice i] += scale * t[t, i, :rank] @ B[slot, slice i, :rank].T, in place."""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from kernels.checks import check_expand
from kernels.meta import LoraMeta
from kernels.tuning import kernel_config


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, N] rows strided by stride_yt, columns contiguous; updated in place
    t_ptr,  # [T, n_slices, R] fp32 contiguous
    b_ptr,  # [S, N, R] contiguous
    sorted_ids_ptr,  # [T] int32
    slot_ids_ptr,  # [G] int32
    starts_ptr,  # [G + 1] int32
    ranks_ptr,  # [S] int32
    scales_ptr,  # [S] fp32
    slice_offsets_ptr,  # [n_slices + 1] int32
    stride_yt,
    stride_tt,
    stride_tn,
    stride_bs,
    stride_bn,
    n_tiles,  # column tiles of the widest slice
    N_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # axis 0: (segment, slice, column tile of the slice); axis 1: row tile of the segment
    pid = tl.program_id(0)
    seg = pid // (N_SLICES * n_tiles)
    sl = (pid // n_tiles) % N_SLICES
    slot = tl.load(slot_ids_ptr + seg)
    if slot < 0:  # the base-only segment
        return
    n_end = tl.load(slice_offsets_ptr + sl + 1)
    n0 = tl.load(slice_offsets_ptr + sl) + (pid % n_tiles) * BLOCK_N
    if n0 >= n_end:  # a narrower slice (k/v next to q) has fewer tiles than the grid's widest
        return
    seg_end = tl.load(starts_ptr + seg + 1)
    m0 = tl.load(starts_ptr + seg) + tl.program_id(1) * BLOCK_M
    if m0 >= seg_end:
        return

    rank = tl.load(ranks_ptr + slot)
    scale = tl.load(scales_ptr + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_end
    tok = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank  # rank masking: t and B columns past the rank are never read
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end

    t_ptrs = t_ptr + tok[:, None] * stride_tt + sl * stride_tn + offs_r[None, :]
    tt = tl.load(t_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None]
    bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
    # t stays fp32 (tf32 on tensor cores for half weights: 10 mantissa bits instead of bf16's 7)
    delta = tl.dot(tt, bt.to(tl.float32), input_precision=DOT_PRECISION) * scale

    y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y_old.dtype), mask=y_mask)


def lora_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
    *,
    config: dict | None = None,
) -> None:
    """Semantics: y[t, o_i:o_i+1] += scale[s] * t[t, i, :rank[s]] @ B[s, o_i:o_i+1, :rank[s]].T  for s = slot[t] >= 0.

    y:       [T, N_total] fp32/bf16/fp16, last dim contiguous; updated in place.
    t:       [T, n_slices, R] float32 contiguous (lora_shrink's output).
    B:       [S, N_total, R] contiguous, same dtype as y.
    meta:    the step's LoraMeta, on y's device.
    scales:  [S] float32, ranks: [S] int32, both on y's device.
    slice_offsets: n_slices + 1 ints from 0 to N_total; slice i owns output rows o_i..o_i+1.
    config:  launch-config overrides (tests): BLOCK_M, BLOCK_N, num_warps, num_stages.
    Each (token, column) is owned by exactly one program, so no atomics are needed.
    """
    T, n, R, N = check_expand(y, t, B, meta, scales, ranks, slice_offsets)
    _check_layout(y, t, B, meta, scales, ranks)
    if not meta.has_lora or R == 0:
        return
    offsets = tuple(slice_offsets)
    cfg = kernel_config("expand", meta.is_decode) | (config or {})
    widest = max(b - a for a, b in zip(offsets, offsets[1:]))
    n_tiles = triton.cdiv(widest, cfg["BLOCK_N"])
    grid = (meta.num_segments * n * n_tiles, triton.cdiv(meta.max_lora_segment, cfg["BLOCK_M"]))
    _expand_kernel[grid](
        y, t, B, meta.sorted_token_ids, meta.slot_ids, meta.starts, ranks, scales,
        _device_offsets(offsets, y.device),
        y.stride(0), t.stride(0), t.stride(1), B.stride(0), B.stride(1), n_tiles,
        N_SLICES=n,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=max(16, triton.next_power_of_2(R)),
        DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


@lru_cache(maxsize=64)
def _device_offsets(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """slice_offsets as an int32 device tensor, made once per (projection group, device)."""
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _check_layout(
    y: torch.Tensor, t: torch.Tensor, B: torch.Tensor, meta: LoraMeta, scales: torch.Tensor, ranks: torch.Tensor
) -> None:
    if y.stride(1) != 1 or not t.is_contiguous() or not B.is_contiguous():
        raise ValueError("y needs a contiguous last dim; t and B must be contiguous")
    if ranks.dtype != torch.int32 or scales.dtype != torch.float32:
        raise TypeError(f"ranks must be int32 and scales float32, got {ranks.dtype} and {scales.dtype}")
    for name, v in (("t", t), ("B", B), ("scales", scales), ("ranks", ranks), ("meta", meta.sorted_token_ids)):
        if v.device != y.device:
            raise ValueError(f"{name} is on {v.device}, y on {y.device}")
