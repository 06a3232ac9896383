"""Random LoRA problems and the naive float64 oracle the kernel tests compare against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import LoraMeta, build_lora_meta

# |got - want| <= ATOL + RTOL * |want|, on problems scaled so that y and the LoRA delta are O(1).
# bf16 keeps 8 significant bits (t is rounded to it once in the reference's packed path).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}
GARBAGE = 1e3  # written past each slot's rank: a kernel that reads it is off by orders of magnitude


@dataclass
class Problem:
    x: torch.Tensor  # [T, H]
    y: torch.Tensor  # [T, N]
    A: torch.Tensor  # [S, n, R, H]
    B: torch.Tensor  # [S, N, R]
    scales: torch.Tensor  # [S] fp32
    ranks: torch.Tensor  # [S] int32
    slice_offsets: tuple[int, ...]
    slots: torch.Tensor  # [T] int64
    meta: LoraMeta


def make_problem(
    slots: list[int],
    slice_sizes: tuple[int, ...],
    hidden: int,
    ranks: list[int],
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Problem:
    g = torch.Generator().manual_seed(seed)
    S, n = len(ranks), len(slice_sizes)
    N = sum(slice_sizes)
    offsets = [0]
    for size in slice_sizes:
        offsets.append(offsets[-1] + size)
    T = len(slots)
    A = torch.randn(S, n, max_rank, hidden, generator=g) / hidden**0.5
    B = torch.randn(S, N, max_rank, generator=g) / max_rank**0.5
    for s, r in enumerate(ranks):
        A[s, :, r:] = GARBAGE
        B[s, :, r:] = GARBAGE
    slot_t = torch.tensor(slots, dtype=torch.int64)
    return Problem(
        x=torch.randn(T, hidden, generator=g).to(dtype),
        y=torch.randn(T, N, generator=g).to(dtype),
        A=A.to(dtype),
        B=B.to(dtype),
        scales=torch.rand(S, generator=g) + 0.5,
        ranks=torch.tensor(ranks, dtype=torch.int32),
        slice_offsets=tuple(offsets),
        slots=slot_t,
        meta=build_lora_meta(slot_t),
    )


def oracle_shrink(p: Problem) -> torch.Tensor:
    """[T, n, R] float64, one token at a time: the semantics, written as plainly as possible."""
    T, n, R = p.x.shape[0], p.A.shape[1], p.A.shape[2]
    t = torch.zeros(T, n, R, dtype=torch.float64)
    for tok, s in enumerate(p.slots.tolist()):
        if s >= 0:
            r = int(p.ranks[s])
            for i in range(n):
                t[tok, i, :r] = p.A[s, i, :r].double() @ p.x[tok].double()
    return t


def oracle_expand(p: Problem, t: torch.Tensor) -> torch.Tensor:
    """y + the LoRA delta, float64, one token and one slice at a time."""
    y = p.y.double().clone()
    offs = p.slice_offsets
    for tok, s in enumerate(p.slots.tolist()):
        if s >= 0:
            r = int(p.ranks[s])
            for i, (lo, hi) in enumerate(zip(offs, offs[1:])):
                y[tok, lo:hi] += float(p.scales[s]) * (p.B[s, lo:hi, :r].double() @ t[tok, i, :r].double())
    return y


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)
