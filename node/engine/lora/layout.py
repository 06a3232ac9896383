"""The interface every LoRA weight layout implements, and the projection groups it serves.

A layout owns the device copy of the slots' adapters (their weights, scales and ranks) and
computes a projection group with its updates. The slot pool decides which adapter goes into
which slot; the layout only stores and applies:

    layout.write(slot, adapter)            # an adapter into a slot, over whatever was there
    plan = layout.prepare(slots, used)     # once per step: what every projection of the step reads
    y = layout.project(layer, group, x, weight, bias, plan)   # per layer and group

Groups and slices (SmolLM2: hidden 576, q 576, kv 192, intermediate 1536):
    qkv      n=3  N=960   slice_offsets (0, 576, 768, 960)
    o        n=1  N=576
    gate_up  n=2  N=3072
    down     n=1  N=576   (H_in = 1536)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar, Generic, TypeVar

import torch

from node.adapters.peft_format import LoraAdapter
from node.engine.model import LlamaModel

P = TypeVar("P")

GROUP_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, mods in GROUP_MODULES.items() for m in mods}


class LoraLayout(ABC, Generic[P]):
    """How a pool of `num_slots` adapters of rank <= `max_rank` is stored and applied; P is the
    type of the per-step plan that `prepare` builds and `project` reads."""

    name: ClassVar[str]

    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int) -> None:
        cfg = model.cfg
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        # group -> (H_in, output size of each slice)
        self.shapes = {"qkv": (h, (q, kv, kv)), "o": (q, (h,)), "gate_up": (h, (i, i)), "down": (i, (h,))}
        self.offsets = {g: tuple(sum(outs[:k]) for k in range(len(outs) + 1)) for g, (_, outs) in self.shapes.items()}
        self.num_layers, self.num_slots, self.max_rank = cfg.num_layers, num_slots, max_rank
        self.dtype, self.device = model.dtype, model.device
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=model.device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=model.device)
        self._groups: list[frozenset[str]] = [frozenset()] * num_slots  # groups each slot's adapter targets

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Put `adapter` into `slot`. Only what the previous occupant wrote is cleared (its groups,
        its first `rank` rows): a full clear of a slot costs ~3x the copy of a rank-8 SmolLM2 adapter."""
        old_rank = int(self.ranks[slot])
        for layer in range(self.num_layers):
            for group in self._groups[slot]:
                self._clear(layer, group, slot, old_rank)
        for (layer, module), (a, b) in adapter.weights.items():  # a: [r, H_in], b: [N_slice, r]
            group = MODULE_GROUP[module]
            self._copy(layer, group, slot, GROUP_MODULES[group].index(module), a, b)
        self.scales[slot] = adapter.scale
        self.ranks[slot] = adapter.rank
        self._groups[slot] = frozenset(MODULE_GROUP[m] for m in adapter.target_modules)

    def groups(self, slots: Iterable[int]) -> frozenset[str]:
        """The projection groups that any of these slots' adapters targets."""
        return frozenset().union(*(self._groups[s] for s in slots))

    @abstractmethod
    def _clear(self, layer: int, group: str, slot: int, rank: int) -> None:
        """Zero the slot's first `rank` ranks of one layer and group, every slice."""

    @abstractmethod
    def _copy(self, layer: int, group: str, slot: int, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one module's a [r, H_in] and b [N_i, r] as slice i of the slot's group."""

    @abstractmethod
    def prepare(self, slots: torch.Tensor, used: set[int]) -> P:
        """Once per step: the plan for the step's token slots ([T], -1 = base only); `used` is the
        set of slots >= 0 among them (non-empty)."""

    @abstractmethod
    def project(
        self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: P
    ) -> torch.Tensor:
        """x [T, H_in] through the group's base weight [N, H_in] (and bias), plus each token's
        own adapter's update: [T, N]."""
