"""The stacked layout: every slot's weights in one stack per layer and group, applied by a kernel.

Per layer and group one A [S, n, R, H_in] and one B [S, N, R], the layout of `kernels.add_lora`.
The kernel backend comes from `kernels.dispatch` (Triton on CUDA, the native C kernel on a CPU
where it builds); it packs the weights once at start and the step's segments once per step,
then each projection is the base GEMM plus one backend call that reads only the slots in use,
up to their ranks. For the C kernel B is stored [S, R, N] (a transposed view gives [S, N, R]) so
that its expand runs along contiguous columns: 6-8% per decode step with 16 adapters in a batch
of 32 (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import kernels
from node.engine.lora.layout import LoraLayout
from node.engine.model import LlamaModel


class StackedLayout(LoraLayout[Any]):
    """Plan: the backend's packed segments of the step (a LoraMeta for torch and Triton)."""

    name = "stacked"

    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int, backend: kernels.LoraBackend) -> None:
        super().__init__(model, num_slots, max_rank)
        self.backend = backend
        S, R, kw = num_slots, max_rank, {"dtype": self.dtype, "device": self.device}
        self.A = [
            {g: torch.zeros(S, len(outs), R, fan_in, **kw) for g, (fan_in, outs) in self.shapes.items()}
            for _ in range(self.num_layers)
        ]  # fmt: skip
        if backend.b_columns:
            self.B = [
                {g: torch.zeros(S, R, self.offsets[g][-1], **kw).transpose(1, 2) for g in self.shapes}
                for _ in range(self.num_layers)
            ]  # fmt: skip
        else:
            self.B = [{g: torch.zeros(S, self.offsets[g][-1], R, **kw) for g in self.shapes} for _ in self.A]
        self.packed = [
            {g: backend.pack(A[g], B[g], self.scales, self.ranks, self.offsets[g]) for g in self.shapes}
            for A, B in zip(self.A, self.B)
        ]  # fmt: skip

    def _clear(self, layer: int, group: str, slot: int, rank: int) -> None:
        self.A[layer][group][slot, :, :rank].zero_()
        self.B[layer][group][slot, :, :rank].zero_()

    def _copy(self, layer: int, group: str, slot: int, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        r, lo, hi = a.shape[0], self.offsets[group][i], self.offsets[group][i + 1]
        self.A[layer][group][slot, i, :r].copy_(a)
        self.B[layer][group][slot, lo:hi, :r].copy_(b)

    def prepare(self, slots: torch.Tensor, used: set[int]) -> Any:
        return self.backend.segments(kernels.build_lora_meta(slots))

    def project(
        self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Any
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        # y from F.linear and x from the model: the model's device and dtype, contiguous [T, N] / [T, H]
        self.backend.apply(y, x, self.packed[layer][group], plan, check=False)
        return y
