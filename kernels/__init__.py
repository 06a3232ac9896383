"""Multi-LoRA kernels: the native C kernel on CPU, Triton on CUDA, the torch reference elsewhere.

    meta = build_lora_meta(token_slots)          # once per engine step
    add_lora(y, x, A, B, scales, ranks, slice_offsets, meta)   # per layer and projection group

`kernels.dispatch` is the one place that picks the implementation (its docstring has the rules);
`add_lora` asks it on every call, the engine's slot pool once (`backend_for`) and keeps the
weights packed for it. Triton is imported on first use, so importing this package works where
Triton does not, and TRITON_INTERPRET may be set any time before the first call. The package
reads no settings of its own from the environment: `configure(KernelConfig(...))` hands them in.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.config import KernelConfig, configure
from kernels.dispatch import BACKENDS, LoraBackend, StackedWeights, backend_for, triton_available, triton_ops_for
from kernels.meta import LoraMeta, build_lora_meta

__all__ = [
    "BACKENDS",
    "KernelConfig",
    "LoraBackend",
    "LoraMeta",
    "StackedWeights",
    "add_lora",
    "backend_for",
    "build_lora_meta",
    "configure",
    "lora_expand",
    "lora_shrink",
    "triton_available",
]


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: torch.Tensor) -> torch.Tensor:
    """Semantics: t[t, i, :rank[s]] = x[t] @ A[s, i, :rank[s]].T  for s = slot[t] >= 0; all else 0.

    x: [T, H_in]; A: [S, n_slices, R, H_in] (same dtype: fp32/bf16/fp16); ranks: [S] int32.
    returns t: [T, n_slices, R] float32. Triton where the dispatch rules pick it, else the
    reference (the C kernel has no separate halves). See kernels.reference.lora_shrink.
    """
    ops = triton_ops_for(x)
    return reference.lora_shrink(x, A, meta, ranks) if ops is None else ops[0].lora_shrink(x, A, meta, ranks)


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

    y: [T, N_total] in place; t: [T, n_slices, R] fp32; B: [S, N_total, R]; scales: [S] fp32;
    ranks: [S] int32; slice_offsets: n_slices + 1 ints from 0 to N_total. See kernels.reference.
    """
    ops = triton_ops_for(y)
    expand = reference.lora_expand if ops is None else ops[1].lora_expand
    expand(y, t, B, meta, scales, ranks, slice_offsets)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: tuple[int, ...],
    meta: LoraMeta,
    *,
    backend: str | None = None,
) -> None:
    """Semantics: y[t, o_i:o_i+1] += scale[s] * (x[t] @ A[s, i, :rank[s]].T) @ B[s, o_i:o_i+1, :rank[s]].T.

    One projection group (fused q/k/v: 3 slices, gate/up: 2, o/down: 1), every adapter of the
    step in one call. Shapes as in lora_shrink and lora_expand. Returns at once when the step has
    no LoRA token. backend: "native", "triton" or "reference" to ask for one (ValueError, with
    the reason, where it cannot run); default: the dispatch rules. Packs the arguments on every
    call; a caller with long-lived weights packs them once through `backend_for`.
    """
    if not meta.has_lora:
        return
    impl = backend_for(y.device, y.dtype, backend)
    impl.apply(y, x, impl.pack(A, B, scales, ranks, slice_offsets), impl.segments(meta))
