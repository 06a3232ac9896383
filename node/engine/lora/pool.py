"""The LoRA slot pool: which adapter sits in which slot of the layout, and the step's LoRA plan.

A slot is taken when a sequence using the adapter is admitted and released when it ends; an
adapter stays resident after its last sequence (a later request reuses it for free) until the slot
is needed, least recently used first. Slots referenced by running sequences are pinned. The
weights themselves live in the pool's `LoraLayout`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from node.adapters.peft_format import LoraAdapter
from node.engine.batch import StepBatch, StepLora
from node.engine.lora.layout import LoraLayout
from node.engine.model import LoraHook

log = logging.getLogger(__name__)


class LoraSlotPool(LoraHook):
    def __init__(self, layout: LoraLayout) -> None:
        self.layout = layout
        self.num_slots = layout.num_slots
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self._refs = [0] * layout.num_slots
        self._free = list(range(layout.num_slots - 1, -1, -1))  # lowest first: keeps the slots in use a short prefix
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
            self.layout.write(slot, adapter)
            self.loads += 1
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

    # -- per step ---------------------------------------------------------------------------------

    def prepare(self, batch: StepBatch) -> None:
        """Once per step: the groups any adapter of the step targets and the layout's plan."""
        batch.lora = None
        if batch.lora_slots is None:
            return
        used = {s for s in batch.lora_slots.tolist() if s >= 0}
        batch.lora = StepLora(self.layout.groups(used), self.layout.prepare(batch.lora_slots, used))

    def project(
        self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: StepBatch
    ) -> torch.Tensor:
        step = batch.lora
        if step is None or group not in step.groups:
            return F.linear(x, weight, bias)  # base-only step, or no adapter in it targets this group
        return self.layout.project(layer, group, x, weight, bias, step.plan)
