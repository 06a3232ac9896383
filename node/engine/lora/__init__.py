"""LoRA on the compute device: a slot pool over one weight layout.

- `pool.LoraSlotPool`: residency (which adapter in which slot, LRU with pinning) and the step's plan.
- `layout.LoraLayout`: the interface of a weight layout (write, prepare, project).
- `stacked.StackedLayout`: stacked A/B per layer and group, applied by the kernel backend that
  `kernels.dispatch` picks (Triton on CUDA, the native C kernel on a CPU).
- `fused.FusedLayout`: A rows below the base weight; for a CPU where the only backend would be
  the torch reference (no C compiler, or fp16), which it beats (docs/architecture.md).
"""

from __future__ import annotations

import logging

import kernels
import kernels.cpu
from node.engine.lora.fused import FusedLayout
from node.engine.lora.layout import GROUP_MODULES, MODULE_GROUP, LoraLayout
from node.engine.lora.pool import LoraSlotPool
from node.engine.lora.stacked import StackedLayout
from node.engine.model import LlamaModel

__all__ = [
    "GROUP_MODULES",
    "MODULE_GROUP",
    "FusedLayout",
    "LoraLayout",
    "LoraSlotPool",
    "StackedLayout",
    "make_layout",
]

LAYOUTS = ("stacked", "fused")
log = logging.getLogger(__name__)


def make_layout(
    model: LlamaModel, num_slots: int, max_rank: int, *, layout: str | None = None, backend: str | None = None
) -> LoraLayout:
    """The weight layout for this model: `layout` ("stacked" or "fused") and, for stacked, the
    kernel `backend` ("native", "triton", "reference") when given; by default stacked over the
    backend that kernels.dispatch picks, except fused where that would be the torch reference on
    a CPU. ValueError (with the reason) for a layout or backend that cannot run here."""
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"unknown LoRA weight layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if layout == "fused":
        if backend is not None:
            raise ValueError("the fused layout runs its own torch ops: it takes no kernel backend")
        made: LoraLayout = FusedLayout(model, num_slots, max_rank)
    else:
        kernel = kernels.backend_for(model.device, model.dtype, backend)
        if layout is None and backend is None and kernel.name == "reference" and model.device.type == "cpu":
            made = FusedLayout(model, num_slots, max_rank)
        else:
            made = StackedLayout(model, num_slots, max_rank, kernel)
    kernel_name = made.backend.name if isinstance(made, StackedLayout) else "torch"
    features = sorted(kernels.cpu.features()) if kernel_name == "native" else []
    features = f" ({', '.join(features)})" if features else ""
    log.info(
        "LoRA slots: %d of rank <= %d, %s layout, %s kernel%s", num_slots, max_rank, made.name, kernel_name, features
    )
    return made
