"""The LoRA slot pool: adapters resident on the compute device, stacked for the multi-LoRA kernels.

Per layer and projection group the pool holds one stacked A and one stacked B (the layout
`kernels.add_lora` takes), with a per-slot rank and scale. A slot is taken when a sequence using
the adapter is admitted and released when it ends; an adapter stays resident after its last
sequence (a later request reuses it for free) until the slot is needed, least recently used first.
Slots referenced by running sequences are pinned and never evicted.

Groups and slices (SmolLM2: hidden 576, q 576, kv 192, intermediate 1536):
    qkv      A [S, 3, R, 576]   B [S, 960, R]    slice_offsets (0, 576, 768, 960)
    o        A [S, 1, R, 576]   B [S, 576, R]
    gate_up  A [S, 2, R, 576]   B [S, 3072, R]
    down     A [S, 1, R, 1536]  B [S, 576, R]
"""

from __future__ import annotations

from collections import OrderedDict

import torch

import kernels
from node.adapters.peft_format import LoraAdapter
from node.engine.batch import StepBatch
from node.engine.model import LoraHook, ModelConfig

GROUP_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, mods in GROUP_MODULES.items() for m in mods}


class LoraSlotPool(LoraHook):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.max_rank = max_rank
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        dims = {"qkv": (h, (q, kv, kv)), "o": (q, (h,)), "gate_up": (h, (i, i)), "down": (i, (h,))}
        self.offsets: dict[str, tuple[int, ...]] = {}
        for group, (_, outs) in dims.items():
            offs = [0]
            for n in outs:
                offs.append(offs[-1] + n)
            self.offsets[group] = tuple(offs)
        self.A = [
            {
                g: torch.zeros(num_slots, len(outs), max_rank, fan_in, dtype=dtype, device=device)
                for g, (fan_in, outs) in dims.items()
            }
            for _ in range(cfg.num_layers)
        ]
        self.B = [
            {g: torch.zeros(num_slots, self.offsets[g][-1], max_rank, dtype=dtype, device=device) for g in dims}
            for _ in range(cfg.num_layers)
        ]
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self._groups: list[frozenset[str]] = [frozenset()] * num_slots  # groups each slot's adapter touches
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self._refs = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self.loads = 0  # adapters written into a slot (misses)

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

    def evict(self, name: str) -> bool:
        """Drop an unpinned adapter (e.g. it was retired); False if absent or in use."""
        slot = self._resident.get(name)
        if slot is None or self._refs[slot]:
            return False
        del self._resident[name]
        self._free.append(slot)
        return True

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

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        r = adapter.rank
        # Clear only what the previous occupant wrote: its groups, its first `rank` rows/columns
        # (a full clear of a slot costs ~3x the copy of a rank-8 SmolLM2 adapter).
        old_rank = int(self.ranks[slot])
        for layer_a, layer_b in zip(self.A, self.B):
            for g in self._groups[slot]:
                layer_a[g][slot, :, :old_rank].zero_()
                layer_b[g][slot, :, :old_rank].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            group = MODULE_GROUP[module]
            i = GROUP_MODULES[group].index(module)
            lo, hi = self.offsets[group][i], self.offsets[group][i + 1]
            self.A[layer][group][slot, i, :r].copy_(a)  # a: [r, in]
            self.B[layer][group][slot, lo:hi, :r].copy_(b)  # b: [out, r]
        self.scales[slot] = adapter.scale
        self.ranks[slot] = r
        self._groups[slot] = frozenset(MODULE_GROUP[m] for m in adapter.target_modules)
        self.loads += 1

    # -- per step ---------------------------------------------------------------------------------

    def prepare(self, batch: StepBatch) -> None:
        """Once per step: the kernels' segment metadata and the groups any adapter in it touches."""
        if batch.lora_slots is None:
            return
        batch.lora_meta = kernels.build_lora_meta(batch.lora_slots)
        slots = {s for s in batch.lora_slots.tolist() if s >= 0}
        batch.extra["lora_groups"] = frozenset().union(*(self._groups[s] for s in slots))

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, batch: StepBatch) -> None:
        if batch.lora_meta is None or group not in batch.extra["lora_groups"]:
            return  # base-only step, or no adapter in it targets this projection
        A, B, meta = self.A[layer][group], self.B[layer][group], batch.lora_meta
        if x.dtype == A.dtype:
            kernels.add_lora(y, x, A, B, self.scales, self.ranks, self.offsets[group], meta)
            return
        # fp32 adapters under a bf16 base (CPU): the small LoRA GEMMs cost ~3 us per op in fp32
        # against ~20 us in bf16 (oneDNN), and the delta keeps full precision until it is added.
        delta = torch.zeros(y.shape, dtype=A.dtype, device=y.device)
        kernels.add_lora(delta, x.to(A.dtype), A, B, self.scales, self.ranks, self.offsets[group], meta)
        y.add_(delta)
