"""The LoRA slot pool: adapters resident on the compute device, applied to every projection group.

A slot is taken when a sequence using the adapter is admitted and released when it ends; an
adapter stays resident after its last sequence (a later request reuses it for free) until the slot
is needed, least recently used first. Slots referenced by running sequences are pinned.

Three weight layouts, chosen by measurement (docs/architecture.md):

- `stacked` (CUDA): per layer and group one stacked A [S, n, R, H_in] and B [S, N, R], the layout
  of `kernels.add_lora` (Triton on the GPU; the torch reference elsewhere).
- `native` (CPU, where `kernels.cpu` builds): the stacked tensors, B stored as [S, R, N] (a
  transposed view gives [S, N, R]) so that the C kernel's expand runs along contiguous columns.
  One call per layer and group after the base GEMM; it reads only the slots in use, up to their
  ranks, and its arguments are packed once (weights at start, segments once per step).
  6-8% per decode step with 16 adapters in a batch of 32 (BENCHMARKS.md).
- `fused` (CPU without a C compiler, or fp16): the slots' A rows are appended below the base
  weight, W_ext = [W; A] of shape [N + S*n*R, H_in], and the model's weight is a view of its first
  N rows. One GEMM then yields
  the base projection and every token's product with every slot's A; `coef` keeps each token's own
  slot (times its scale) and one more GEMM against a block-diagonal B_ext [S*n*R, N] adds the
  update. On a 2-core CPU each extra op costs 20-50 us once the base GEMMs have flushed the caches,
  so two extra ops per group beat any per-adapter loop; the extra FLOPs are those of S small
  rank-R matrices, paid only for the slots in use (a prefix of the slot range).

Groups and slices (SmolLM2: hidden 576, q 576, kv 192, intermediate 1536):
    qkv      n=3  N=960   slice_offsets (0, 576, 768, 960)
    o        n=1  N=576
    gate_up  n=2  N=3072
    down     n=1  N=576   (H_in = 1536)
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

import kernels
import kernels.cpu
from node.adapters.peft_format import LoraAdapter
from node.engine.batch import StepBatch
from node.engine.model import LlamaModel, LoraHook

log = logging.getLogger(__name__)

GROUP_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, mods in GROUP_MODULES.items() for m in mods}


def default_layout(model: LlamaModel) -> str:
    """stacked on CUDA; on a CPU native where the C kernel builds for the model's dtype, else fused."""
    if model.device.type == "cuda":
        return "stacked"
    return "native" if model.dtype in kernels.cpu.DTYPES and kernels.cpu.available() else "fused"


class LoraSlotPool(LoraHook):
    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int, *, layout: str | None = None):
        cfg = model.cfg
        self.num_slots = num_slots
        self.num_layers = cfg.num_layers
        self.max_rank = max_rank
        self.layout = layout or default_layout(model)
        if self.layout not in ("stacked", "native", "fused"):
            raise ValueError(f"unknown LoRA weight layout {self.layout!r}")
        if self.layout == "native" and not (model.device.type == "cpu" and kernels.cpu.available()):
            raise ValueError(
                f"the native layout needs a CPU model and the native kernel ({kernels.cpu.unavailable_reason()})"
            )
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        dims = {"qkv": (h, (q, kv, kv)), "o": (q, (h,)), "gate_up": (h, (i, i)), "down": (i, (h,))}
        self.offsets = {g: tuple(sum(outs[:k]) for k in range(len(outs) + 1)) for g, (_, outs) in dims.items()}
        self.n_slices = {g: len(outs) for g, (_, outs) in dims.items()}
        dtype, device, S, R = model.dtype, model.device, num_slots, max_rank
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        if self.layout in ("stacked", "native"):
            self.A = [
                {g: torch.zeros(S, len(outs), R, fan_in, dtype=dtype, device=device) for g, (fan_in, outs) in dims.items()}
                for _ in range(cfg.num_layers)
            ]  # fmt: skip
            if self.layout == "stacked":
                self.B = [
                    {g: torch.zeros(S, self.offsets[g][-1], R, dtype=dtype, device=device) for g in dims}
                    for _ in range(cfg.num_layers)
                ]
            else:
                self.B = [
                    {
                        g: torch.zeros(S, R, self.offsets[g][-1], dtype=dtype, device=device).transpose(1, 2)
                        for g in dims
                    }
                    for _ in range(cfg.num_layers)
                ]
                self.native = [
                    {g: kernels.cpu.LoraWeights(A[g], B[g], self.scales, self.ranks, self.offsets[g]) for g in dims}
                    for A, B in zip(self.A, self.B)
                ]
        else:
            self.W_ext, self.B_ext = [], []
            for lw in model.layers:
                w_ext, b_ext = {}, {}
                for g, (fan_in, outs) in dims.items():
                    base = getattr(lw, g)  # [N, H_in]
                    N = base.shape[0]
                    w = torch.zeros(N + S * len(outs) * R, fan_in, dtype=dtype, device=device)
                    w[:N] = base
                    setattr(lw, g, w[:N])  # the model now reads the base rows in place
                    w_ext[g] = w
                    b_ext[g] = torch.zeros(S * len(outs) * R, N, dtype=dtype, device=device)
                self.W_ext.append(w_ext)
                self.B_ext.append(b_ext)
        self._groups: list[frozenset[str]] = [frozenset()] * num_slots  # groups each slot's adapter touches
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self._refs = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # lowest first: keeps the slots in use a short prefix
        self.loads = 0  # adapters written into a slot (misses)
        model.lora = self
        extra = f" ({', '.join(sorted(kernels.cpu.features()))})" if self.layout == "native" else ""
        log.info("LoRA slots: %d of rank <= %d, %s layout%s", num_slots, max_rank, self.layout, extra)

    # -- residency (engine thread) ---------------------------------------------------------------

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """The adapter's slot, loading it (evicting the LRU unpinned adapter) if needed; None if
        every slot is pinned by running sequences."""
        slot = self._resident.get(adapter.name)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            self._write(slot, adapter)
            self._resident[adapter.name] = slot
        self._resident.move_to_end(adapter.name)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        assert self._refs[slot] > 0, f"slot {slot} released more often than acquired"
        self._refs[slot] -= 1

    def resident(self) -> list[str]:
        return list(self._resident)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for name, slot in self._resident.items():  # least recently used first
            if self._refs[slot] == 0:
                del self._resident[name]
                return slot
        return None

    def _rows(self, group: str, slot: int, i: int, r: int) -> slice:
        """Rows of slot `slot`, slice `i` in the fused layout's A block (and B_ext)."""
        start = (slot * self.n_slices[group] + i) * self.max_rank
        return slice(start, start + r)

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        # Clear only what the previous occupant wrote: its groups, its first `rank` rows/columns
        # (a full clear of a slot costs ~3x the copy of a rank-8 SmolLM2 adapter).
        old_rank = int(self.ranks[slot])
        for layer in range(self.num_layers):
            for g in self._groups[slot]:
                if self.layout != "fused":
                    self.A[layer][g][slot, :, :old_rank].zero_()
                    self.B[layer][g][slot, :, :old_rank].zero_()
                else:
                    N = self.offsets[g][-1]
                    for i in range(self.n_slices[g]):
                        rows = self._rows(g, slot, i, old_rank)
                        self.W_ext[layer][g][N + rows.start : N + rows.stop].zero_()
                        self.B_ext[layer][g][rows].zero_()
        r = adapter.rank
        for (layer, module), (a, b) in adapter.weights.items():  # a: [r, in], b: [out, r]
            group = MODULE_GROUP[module]
            i = GROUP_MODULES[group].index(module)
            lo, hi = self.offsets[group][i], self.offsets[group][i + 1]
            if self.layout != "fused":
                self.A[layer][group][slot, i, :r].copy_(a)
                self.B[layer][group][slot, lo:hi, :r].copy_(b)
            else:
                rows, N = self._rows(group, slot, i, r), self.offsets[group][-1]
                self.W_ext[layer][group][N + rows.start : N + rows.stop].copy_(a)
                self.B_ext[layer][group][rows, lo:hi].copy_(b.T)
        self.scales[slot] = adapter.scale
        self.ranks[slot] = r
        self._groups[slot] = frozenset(MODULE_GROUP[m] for m in adapter.target_modules)
        self.loads += 1

    # -- per step ---------------------------------------------------------------------------------

    def prepare(self, batch: StepBatch) -> None:
        """Once per step: the groups any adapter in the step touches, and the layout's metadata
        (the kernels' segments, or the fused layout's per-token coefficients)."""
        if batch.lora_slots is None:
            return
        slots = {s for s in batch.lora_slots.tolist() if s >= 0}
        batch.extra["lora_groups"] = frozenset().union(*(self._groups[s] for s in slots))
        if self.layout != "fused":
            batch.lora_meta = meta = kernels.build_lora_meta(batch.lora_slots)
            if self.layout == "native":
                batch.extra["segments"] = kernels.cpu.LoraSegments(meta)
            return
        used = max(slots) + 1  # slots [0, used) take part: a prefix, as free slots go lowest first
        coef = torch.zeros(batch.num_tokens, used, dtype=torch.float32)
        rows = (batch.lora_slots >= 0).nonzero().squeeze(1)
        cols = batch.lora_slots[rows]
        coef[rows, cols] = self.scales[cols]
        batch.lora_meta = (used, coef)
        batch.extra["coef"] = {}  # per slice count n: coef repeated over [n, R] -> [T, used * n * R]

    def project(
        self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: StepBatch
    ) -> torch.Tensor:
        if batch.lora_meta is None or group not in batch.extra["lora_groups"]:
            return F.linear(x, weight, bias)  # base-only step, or no adapter in it targets this group
        if self.layout == "native":
            y = F.linear(x, weight, bias)
            # y from F.linear and x from the model: CPU, the model's dtype, contiguous [T, N] / [T, H]
            kernels.cpu.apply(y, x, self.native[layer][group], batch.extra["segments"], check=False)
            return y
        if self.layout != "fused":
            y = F.linear(x, weight, bias)
            A, B = self.A[layer][group], self.B[layer][group]
            kernels.add_lora(y, x, A, B, self.scales, self.ranks, self.offsets[group], batch.lora_meta)
            return y
        used, coef = batch.lora_meta
        n, N = self.n_slices[group], weight.shape[0]
        k = used * n * self.max_rank
        out = F.linear(x, self.W_ext[layer][group][: N + k])  # [T, N + k]: base and every slot's x A^T
        cache = batch.extra["coef"]
        if n not in cache:
            cache[n] = coef.repeat_interleave(n * self.max_rank, dim=1).to(out.dtype)
        z = out[:, N:].mul_(cache[n])  # [T, k]: each token's own slot, scaled
        y = out[:, :N].addmm_(z, self.B_ext[layer][group][:k])  # base + z @ B_ext, in place (row stride N + k)
        return y if bias is None else y.add_(bias)
