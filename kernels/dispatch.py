"""The one place that picks how a LoRA update is computed: the native C kernel, Triton, or the torch reference.

    backend = backend_for(device, dtype)                        # once: the slot pool, or add_lora per call
    weights = backend.pack(A, B, scales, ranks, slice_offsets)  # once per layer and projection group
    segments = backend.segments(meta)                           # once per engine step
    backend.apply(y, x, weights, segments)                      # per layer and group

Every backend computes the same thing (kernels.add_lora's semantics) on the same stacked
weights, A [S, n, R, H_in] and B [S, N, R]; they differ in where they run and in how they want B
stored (`b_columns`: the C kernel expands along contiguous output columns, so the slot pool keeps
B as [S, R, N] storage seen through a transposed view; Triton wants B contiguous).

The rules, in order (the first that applies wins):
1. `KernelConfig.force_triton` (the node's `OPENLORA_FORCE_TRITON=1`): Triton (on CPU tensors only
   under `TRITON_INTERPRET=1`: tests).
2. CUDA tensors: Triton, or the reference where Triton does not import.
3. CPU tensors of a dtype the C kernel has (fp32, bf16), where it builds: native.
4. Everything else: the reference.
`backend_for(..., name=...)` asks for one backend by name and says why when it cannot run here.
Triton is imported on first use, so this module works where Triton does not import.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar, Generic, TypeVar

import torch

from kernels import config, cpu, reference
from kernels.meta import LoraMeta

W = TypeVar("W")
S = TypeVar("S")

_triton_ops: tuple[ModuleType, ModuleType] | None = None
_triton_error: Exception | None = None


@dataclass(frozen=True)
class StackedWeights:
    """One layer and group's stacked weights with the pool's per-slot scales and ranks, as the
    torch and Triton backends take them (they read the tensors in place, so later writes show)."""

    A: torch.Tensor  # [S, n, R, H_in]
    B: torch.Tensor  # [S, N, R]
    scales: torch.Tensor  # [S] fp32
    ranks: torch.Tensor  # [S] int32
    slice_offsets: tuple[int, ...]


class LoraBackend(ABC, Generic[W, S]):
    """One implementation of y += LoRA(x) over stacked weights: packed weights of type W, per-step
    segments of type S."""

    name: ClassVar[str]
    b_columns: ClassVar[bool] = False  # B wanted as [S, R, N] storage (a transposed view gives [S, N, R])

    @abstractmethod
    def pack(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        scales: torch.Tensor,
        ranks: torch.Tensor,
        slice_offsets: tuple[int, ...],
    ) -> W: ...

    @abstractmethod
    def segments(self, meta: LoraMeta) -> S: ...

    @abstractmethod
    def apply(self, y: torch.Tensor, x: torch.Tensor, weights: W, segments: S, *, check: bool = True) -> None:
        """y += the update of x; a step without LoRA tokens returns at once. check=False lets a
        caller that guarantees the shapes (the slot pool) skip the per-call checks of y and x
        where a backend can skip them."""


class ReferenceBackend(LoraBackend[StackedWeights, LoraMeta]):
    """The torch ops of `kernels.reference`: runs anywhere, the oracle of the other two."""

    name = "reference"

    def pack(self, A, B, scales, ranks, slice_offsets) -> StackedWeights:
        return StackedWeights(A, B, scales, ranks, tuple(slice_offsets))

    def segments(self, meta: LoraMeta) -> LoraMeta:
        return meta

    def apply(self, y, x, weights: StackedWeights, segments: LoraMeta, *, check: bool = True) -> None:
        w = weights
        reference.shrink_expand(y, x, w.A, w.B, w.scales, w.ranks, w.slice_offsets, segments)


class TritonBackend(ReferenceBackend):
    """The Triton kernels (`kernels/shrink.py`, `kernels/expand.py`): one shrink and one expand launch."""

    name = "triton"

    def apply(self, y, x, weights: StackedWeights, segments: LoraMeta, *, check: bool = True) -> None:
        if not segments.has_lora:
            return
        shrink, expand = _triton_for(y)
        w = weights
        t = shrink.lora_shrink(x, w.A, segments, w.ranks)
        expand.lora_expand(y, t, w.B, segments, w.scales, w.ranks, w.slice_offsets)


class NativeBackend(LoraBackend[cpu.LoraWeights, cpu.LoraSegments]):
    """The C kernel of `kernels/cpu.py`: arguments packed once, one call per layer and group."""

    name = "native"
    b_columns = True

    def pack(self, A, B, scales, ranks, slice_offsets) -> cpu.LoraWeights:
        return cpu.LoraWeights(A, B, scales, ranks, tuple(slice_offsets))

    def segments(self, meta: LoraMeta) -> cpu.LoraSegments:
        return cpu.LoraSegments(meta)

    def apply(self, y, x, weights: cpu.LoraWeights, segments: cpu.LoraSegments, *, check: bool = True) -> None:
        cpu.apply(y, x, weights, segments, check=check)


BACKENDS: dict[str, LoraBackend] = {b.name: b for b in (NativeBackend(), TritonBackend(), ReferenceBackend())}


def backend_for(device: torch.device | str, dtype: torch.dtype, name: str | None = None) -> LoraBackend:
    """The backend for tensors of this device and dtype (the module's rules), or the one named.

    Raises ValueError when the named backend cannot run these tensors here, saying why."""
    device = torch.device(device)
    if name is None:
        name = _pick(device, dtype)
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA kernel backend {name!r} (one of {sorted(BACKENDS)})")
    reason = _cannot_run(name, device, dtype)
    if reason is not None:
        raise ValueError(f"the {name} LoRA kernel cannot run {device.type} {dtype} tensors here: {reason}")
    return BACKENDS[name]


def _pick(device: torch.device, dtype: torch.dtype) -> str:
    if _forced_triton() or (device.type == "cuda" and _load_triton() is not None):
        return "triton"
    if device.type == "cpu" and _cannot_run("native", device, dtype) is None:
        return "native"
    return "reference"


def _cannot_run(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "native":
        if device.type != "cpu":
            return "it runs on the CPU only"
        if dtype not in cpu.DTYPES:
            return f"it has {', '.join(map(str, cpu.DTYPES))} only"
        return None if cpu.available() else cpu.unavailable_reason()
    if name == "triton":
        if _load_triton() is None:
            return f"Triton failed to import ({_triton_error!r})"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels on CPU tensors need TRITON_INTERPRET=1"
    return None


def _forced_triton() -> bool:
    if not config.current().force_triton:
        return False
    if _load_triton() is None:
        raise RuntimeError(f"OPENLORA_FORCE_TRITON=1 but Triton failed to import: {_triton_error!r}")
    return True


def _triton_for(tensor: torch.Tensor) -> tuple[ModuleType, ModuleType]:
    """The Triton (shrink, expand) modules, checked for the tensor's device."""
    reason = _cannot_run("triton", tensor.device, tensor.dtype)
    if reason is not None:
        raise RuntimeError(reason)
    return _load_triton()


def triton_ops_for(tensor: torch.Tensor) -> tuple[ModuleType, ModuleType] | None:
    """The Triton (shrink, expand) modules when the rules pick Triton for `tensor`, else None
    (the reference then serves): for the separate shrink and expand ops."""
    return _triton_for(tensor) if _pick(tensor.device, tensor.dtype) == "triton" else None


def triton_available() -> bool:
    """Whether the Triton kernels can be imported here (imports them on first call)."""
    return _load_triton() is not None


def _load_triton() -> tuple[ModuleType, ModuleType] | None:
    global _triton_ops, _triton_error
    if _triton_ops is None and _triton_error is None:
        try:
            from kernels import expand, shrink

            _triton_ops = (shrink, expand)
        except Exception as e:  # no Triton, or no backend for it: the reference serves instead
            _triton_error = e
    return _triton_ops
