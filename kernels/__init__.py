"""Multi-LoRA kernels: Triton on CUDA, the torch reference everywhere else.

    meta = build_lora_meta(token_slots)          # once per engine step
    add_lora(y, x, A, B, scales, ranks, slice_offsets, meta)   # per layer and projection group

Dispatch: the Triton kernels when the tensors are on CUDA, or when OPENLORA_FORCE_TRITON=1 (with
TRITON_INTERPRET=1 that runs them on CPU tensors, for tests); otherwise `kernels.reference`.
Triton is imported on first use, so importing this package works where Triton does not (the ops
then fall back to the reference), and TRITON_INTERPRET may be set any time before the first call.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from kernels import reference
from kernels.meta import LoraMeta, build_lora_meta

__all__ = ["LoraMeta", "build_lora_meta", "lora_shrink", "lora_expand", "add_lora", "triton_available"]

_triton_ops: tuple[ModuleType, ModuleType] | None = None
_triton_error: Exception | None = None


def triton_available() -> bool:
    """Whether the Triton kernels can be imported here (imports them on first call)."""
    return _load_triton() is not None


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: torch.Tensor) -> torch.Tensor:
    """Semantics: t[t, i, :rank[s]] = x[t] @ A[s, i, :rank[s]].T  for s = slot[t] >= 0; all else 0.

    x: [T, H_in]; A: [S, n_slices, R, H_in] (same dtype: fp32/bf16/fp16); ranks: [S] int32.
    returns t: [T, n_slices, R] float32. See kernels.reference.lora_shrink.
    """
    ops = _kernels_for(x)
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
    ops = _kernels_for(y)
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
) -> None:
    """Semantics: y[t, o_i:o_i+1] += scale[s] * (x[t] @ A[s, i, :rank[s]].T) @ B[s, o_i:o_i+1, :rank[s]].T.

    The engine's one call per layer and projection group (fused q/k/v: 3 slices, gate/up: 2,
    o/down: 1): one shrink launch and one expand launch whatever the number of adapters.
    Returns at once when the step has no LoRA token. Shapes as in lora_shrink and lora_expand.
    """
    if not meta.has_lora:
        return
    ops = _kernels_for(y)
    if ops is None:
        reference.add_lora(y, x, A, B, scales, ranks, slice_offsets, meta)
    else:
        ops[1].lora_expand(y, ops[0].lora_shrink(x, A, meta, ranks), B, meta, scales, ranks, slice_offsets)


def _kernels_for(tensor: torch.Tensor) -> tuple[ModuleType, ModuleType] | None:
    """The Triton (shrink, expand) modules when they should run on `tensor`, else None."""
    if not (tensor.is_cuda or os.environ.get("OPENLORA_FORCE_TRITON") == "1"):
        return None
    ops = _load_triton()
    if ops is None:
        if os.environ.get("OPENLORA_FORCE_TRITON") == "1":
            raise RuntimeError(f"OPENLORA_FORCE_TRITON=1 but Triton failed to import: {_triton_error!r}")
        return None
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    return ops


def _load_triton() -> tuple[ModuleType, ModuleType] | None:
    global _triton_ops, _triton_error
    if _triton_ops is None and _triton_error is None:
        try:
            from kernels import expand, shrink

            _triton_ops = (shrink, expand)
        except Exception as e:  # no Triton, or no backend for it: the reference serves instead
            _triton_error = e
    return _triton_ops
