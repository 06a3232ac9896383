"""Triton LoRA shrink: t[t, i, :rank] = x[t] @ A[slot, i, :rank].T for the tokens of every segment."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_shrink
from kernels.meta import LoraMeta
from kernels.tuning import kernel_config, split_k


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, H] activations, rows strided by stride_xt, columns contiguous
    a_ptr,  # [S, n_slices, R, H] contiguous
    t_ptr,  # [T, n_slices, R] fp32 contiguous, zeroed by the launcher
    sorted_ids_ptr,  # [T] int32
    slot_ids_ptr,  # [G] int32
    starts_ptr,  # [G + 1] int32
    ranks_ptr,  # [S] int32
    hidden,
    k_per_split,  # a multiple of BLOCK_K
    r_blocks,
    stride_xt,
    stride_as,
    stride_an,
    stride_ar,
    stride_tt,
    stride_tn,
    N_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ATOMIC: tl.constexpr,  # split-K: partial sums meet in t
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16's raw bits (triton 3.9)
):
    # axis 0: (segment, slice, rank block); axis 1: row tile of the segment; axis 2: K split
    pid = tl.program_id(0)
    seg = pid // (N_SLICES * r_blocks)
    sl = (pid // r_blocks) % N_SLICES
    r0 = (pid % r_blocks) * BLOCK_R
    slot = tl.load(slot_ids_ptr + seg)
    if slot < 0:  # the base-only segment
        return
    rank = tl.load(ranks_ptr + slot)
    if r0 >= rank:  # rank masking: blocks past this adapter's rank do no work at all
        return
    seg_end = tl.load(starts_ptr + seg + 1)
    m0 = tl.load(starts_ptr + seg) + tl.program_id(1) * BLOCK_M
    if m0 >= seg_end:  # the grid is sized for the longest segment
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_end
    tok = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    k0 = tl.program_id(2) * k_per_split
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + sl * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # fp32 accumulate whatever the input dtype
    for k in range(0, k_per_split, BLOCK_K):
        k_mask = offs_k + k < hidden
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K

    t_ptrs = t_ptr + tok[:, None] * stride_tt + sl * stride_tn + offs_r[None, :]
    t_mask = m_mask[:, None] & r_mask[None, :]
    if ATOMIC:
        tl.atomic_add(t_ptrs, acc, mask=t_mask)
    else:
        tl.store(t_ptrs, acc, mask=t_mask)


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: torch.Tensor, *, config: dict | None = None
) -> torch.Tensor:
    """Semantics: t[t, i, :rank[s]] = x[t] @ A[s, i, :rank[s]].T  for s = slot[t] >= 0; all else 0.

    x:      [T, H_in] fp32/bf16/fp16, last dim contiguous.
    A:      [S, n_slices, R, H_in] contiguous, same dtype as x.
    meta:   the step's LoraMeta, on x's device.
    ranks:  [S] int32 on x's device.
    config: launch-config overrides (tests): BLOCK_M, BLOCK_K, BLOCK_R, SPLIT_K, num_warps, num_stages.
    returns t: [T, n_slices, R] float32.
    """
    T, n, R, H = check_shrink(x, A, meta, ranks)
    _check_layout(x, A, meta, ranks)
    t = torch.zeros((T, n, R), dtype=torch.float32, device=x.device)  # split-K adds into it
    if not meta.has_lora or R == 0:
        return t

    cfg = kernel_config("shrink", meta.is_decode) | (config or {})
    block_r = min(cfg["BLOCK_R"], max(16, triton.next_power_of_2(R)))  # tl.dot needs >= 16
    r_blocks = triton.cdiv(R, block_r)
    m_tiles = triton.cdiv(meta.max_lora_segment, cfg["BLOCK_M"])
    k_blocks = triton.cdiv(H, cfg["BLOCK_K"])
    splits = cfg.get("SPLIT_K") or split_k(meta.num_segments * n * r_blocks * m_tiles, k_blocks, x.device)
    k_per_split = triton.cdiv(k_blocks, splits) * cfg["BLOCK_K"]
    splits = triton.cdiv(H, k_per_split)  # no empty split
    grid = (meta.num_segments * n * r_blocks, m_tiles, splits)
    _shrink_kernel[grid](
        x, A, t, meta.sorted_token_ids, meta.slot_ids, meta.starts, ranks,
        H, k_per_split, r_blocks,
        x.stride(0), A.stride(0), A.stride(1), A.stride(2), t.stride(0), t.stride(1),
        N_SLICES=n, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r, ATOMIC=splits > 1,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=x.dtype == torch.bfloat16 and not x.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return t


def _check_layout(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: torch.Tensor) -> None:
    if x.stride(1) != 1 or not A.is_contiguous():
        raise ValueError("x needs a contiguous last dim and A must be contiguous")
    if ranks.dtype != torch.int32:
        raise TypeError(f"ranks must be int32, got {ranks.dtype}")
    for name, v in (("A", A), ("ranks", ranks), ("meta", meta.sorted_token_ids)):
        if v.device != x.device:
            raise ValueError(f"{name} is on {v.device}, x on {x.device}")
