"""The fused layout: the slots' A rows stored below the base weight, two GEMMs per projection.

For a CPU where no kernel backend beats torch (no C compiler, or fp16). The model keeps each
group's weight with spare rows below it (`LlamaModel.reserve_rows`), W_ext = [W; A] of shape
[N + S*n*R, H_in], and reads its first N rows in place. One GEMM against the rows in use yields
the base projection and every token's product with every slot's A; the plan's `coef` keeps each
token's own slot (times its scale) and one more GEMM against a block-diagonal B_ext [S*n*R, N]
adds the update. On a 2-core CPU each extra op costs 20-50 us once the base GEMMs have flushed
the caches, so two extra ops per group beat any per-adapter loop; the extra FLOPs are those of
the slots in use only (a prefix of the slot range: the pool hands out free slots lowest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from node.engine.lora.layout import LoraLayout
from node.engine.model import LlamaModel


@dataclass
class FusedPlan:
    used: int  # slots [0, used) take part this step
    coef: torch.Tensor  # [T, used] fp32: each token's own slot's scale, 0 elsewhere
    repeated: dict[int, torch.Tensor] = field(default_factory=dict)  # per slice count n: [T, used * n * R]


class FusedLayout(LoraLayout[FusedPlan]):
    name = "fused"

    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int) -> None:
        super().__init__(model, num_slots, max_rank)
        rows = {g: num_slots * len(outs) * max_rank for g, (_, outs) in self.shapes.items()}
        by_group = {g: model.reserve_rows(g, rows[g]) for g in self.shapes}
        self.W_ext = [{g: by_group[g][layer] for g in self.shapes} for layer in range(self.num_layers)]
        self.B_ext = [
            {g: torch.zeros(rows[g], self.offsets[g][-1], dtype=self.dtype, device=self.device) for g in self.shapes}
            for _ in range(self.num_layers)
        ]  # fmt: skip

    def _rows(self, group: str, slot: int, i: int, r: int) -> slice:
        """Rows of slot `slot`, slice `i` in the A block (and in B_ext)."""
        start = (slot * len(self.shapes[group][1]) + i) * self.max_rank
        return slice(start, start + r)

    def _clear(self, layer: int, group: str, slot: int, rank: int) -> None:
        N = self.offsets[group][-1]
        for i in range(len(self.shapes[group][1])):
            rows = self._rows(group, slot, i, rank)
            self.W_ext[layer][group][N + rows.start : N + rows.stop].zero_()
            self.B_ext[layer][group][rows].zero_()

    def _copy(self, layer: int, group: str, slot: int, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rows, N = self._rows(group, slot, i, a.shape[0]), self.offsets[group][-1]
        lo, hi = self.offsets[group][i], self.offsets[group][i + 1]
        self.W_ext[layer][group][N + rows.start : N + rows.stop].copy_(a)
        self.B_ext[layer][group][rows, lo:hi].copy_(b.T)

    def prepare(self, slots: torch.Tensor, used: set[int]) -> FusedPlan:
        n_used = max(used) + 1
        coef = torch.zeros(slots.shape[0], n_used, dtype=torch.float32, device=slots.device)
        rows = (slots >= 0).nonzero().squeeze(1)
        cols = slots[rows]
        coef[rows, cols] = self.scales[cols]
        return FusedPlan(n_used, coef)

    def project(
        self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: FusedPlan
    ) -> torch.Tensor:
        n, N = len(self.shapes[group][1]), weight.shape[0]
        k = plan.used * n * self.max_rank
        out = F.linear(x, self.W_ext[layer][group][: N + k])  # [T, N + k]: base and every slot's x A^T
        if n not in plan.repeated:
            plan.repeated[n] = plan.coef.repeat_interleave(n * self.max_rank, dim=1).to(out.dtype)
        z = out[:, N:].mul_(plan.repeated[n])  # [T, k]: each token's own slot, scaled
        y = out[:, :N].addmm_(z, self.B_ext[layer][group][:k])  # base + z @ B_ext, in place (row stride N + k)
        return y if bias is None else y.add_(bias)
