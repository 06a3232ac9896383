"""Argument checks shared by the torch reference and the Triton launchers.

Each returns the sizes it read, so a caller checks and unpacks in one line. They cost about a
microsecond (attribute reads only, no device sync).
"""

from __future__ import annotations

import torch

from kernels.meta import LoraMeta

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: torch.Tensor) -> tuple[int, int, int, int]:
    """Return (T, n_slices, R, H_in) after checking x [T, H_in], A [S, n_slices, R, H_in], ranks [S]."""
    if x.dim() != 2 or A.dim() != 4:
        raise ValueError(f"x must be [T, H_in] and A [S, n_slices, R, H_in], got {tuple(x.shape)} and {tuple(A.shape)}")
    T, H = x.shape
    S, n, R, H_a = A.shape
    if H_a != H:
        raise ValueError(f"A's last dim {H_a} != x's hidden size {H}")
    if T != meta.num_tokens:
        raise ValueError(f"x has {T} tokens, meta {meta.num_tokens}")
    if x.dtype not in DTYPES or A.dtype != x.dtype:
        raise TypeError(f"x and A must share one of {DTYPES}, got {x.dtype} and {A.dtype}")
    check_per_slot(ranks, S, "ranks")
    return T, n, R, H


def check_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
) -> tuple[int, int, int, int]:
    """Return (T, n_slices, R, N_total) after checking y [T, N_total], t [T, n_slices, R] fp32, B [S, N_total, R]."""
    if t.dim() != 3:
        raise ValueError(f"t must be [T, n_slices, R], got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"t must be float32 (lora_shrink's output), got {t.dtype}")
    T, n, R = t.shape
    return T, n, R, check_output(y, B, meta, scales, ranks, slice_offsets, T, n, R)


def check_add(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
    meta: LoraMeta,
) -> tuple[int, int, int, int, int]:
    """Return (T, n_slices, R, H_in, N_total) after checking add_lora's arguments."""
    T, n, R, H = check_shrink(x, A, meta, ranks)
    return T, n, R, H, check_output(y, B, meta, scales, ranks, slice_offsets, T, n, R)


def check_output(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
    T: int,
    n: int,
    R: int,
) -> int:
    """Return N_total after checking y [T, N_total], B [S, N_total, R] and the n + 1 slice offsets."""
    if y.dim() != 2 or B.dim() != 3:
        raise ValueError(f"y must be [T, N] and B [S, N, R], got {tuple(y.shape)} and {tuple(B.shape)}")
    N = y.shape[1]
    if y.shape[0] != T or T != meta.num_tokens or B.shape[1] != N or B.shape[2] != R:
        raise ValueError(
            f"shape mismatch: y {tuple(y.shape)}, B {tuple(B.shape)}, T={T}, R={R}, meta T={meta.num_tokens}"
        )
    if y.dtype not in DTYPES or B.dtype != y.dtype:
        raise TypeError(f"y and B must share one of {DTYPES}, got {y.dtype} and {B.dtype}")
    check_slice_offsets(slice_offsets, n, N)
    check_per_slot(scales, B.shape[0], "scales")
    check_per_slot(ranks, B.shape[0], "ranks")
    return N


def check_slice_offsets(slice_offsets: tuple[int, ...], n: int, N: int) -> None:
    """n + 1 offsets rising strictly from 0 to N_total."""
    offsets = tuple(slice_offsets)
    if (
        len(offsets) != n + 1
        or offsets[0] != 0
        or offsets[-1] != N
        or any(a >= b for a, b in zip(offsets, offsets[1:]))
    ):
        raise ValueError(f"slice_offsets {offsets} must rise strictly from 0 to N_total={N} in {n} steps")


def check_per_slot(v: torch.Tensor, num_slots: int, name: str) -> None:
    if v.dim() != 1 or v.shape[0] != num_slots:
        raise ValueError(f"{name} must be [S={num_slots}], got {tuple(v.shape)}")
