"""Per-step LoRA batch metadata: the tokens of a step grouped by slot into sorted segments.

Built once per engine step by `build_lora_meta` and read by every LoRA layer of that step, so the
sort, the segment boundaries and the one host-to-device copy are paid once, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kernels.plan import TorchPlan, build_torch_plan

# A step is decode-like when no LoRA segment is longer than one kernel row tile; the kernels
# then pick the small-M config (and split-K for the shrink), prefill-like steps the large-M one.
DECODE_MAX_SEGMENT = 16


@dataclass(frozen=True, eq=False)
class LoraMeta:
    """Which tokens of a step use which LoRA slot, grouped into segments sorted by slot.

    Worked example: 18 tokens, 3 of them base-only (slot -1), 10 on slot 0, 5 on slot 2, in any
    order in the batch. `sorted_token_ids` lists the token indices grouped by slot (ascending
    slot, batch order kept inside a segment); segment g is
    `sorted_token_ids[starts[g]:starts[g + 1]]` and all of its tokens use slot `slot_ids[g]`:

        slot_ids  [-1, 0, 2]        the base-only segment, when present, is always first
        counts    [3, 10, 5]
        starts    [0, 3, 13, 18]    len G + 1; starts[-1] == T

    Slots with no tokens this step have no segment, so kernels never visit them. The device
    tensors are int32 on the device of the step; the `host_*` fields are the same facts as Python
    values, so launchers size their grids and the CPU path plans its work without a device sync.
    """

    token_slots: torch.Tensor  # [T] int32: slot per token, -1 = base only
    sorted_token_ids: torch.Tensor  # [T] int32: token indices grouped by slot
    slot_ids: torch.Tensor  # [G] int32: slot of each segment, ascending
    counts: torch.Tensor  # [G] int32: tokens per segment
    starts: torch.Tensor  # [G + 1] int32: segment boundaries in sorted_token_ids
    host_slot_ids: tuple[int, ...]
    host_starts: tuple[int, ...]
    num_lora_tokens: int  # tokens with a slot >= 0
    max_lora_segment: int  # longest segment with a slot >= 0 (0 when none): sizes kernel grids

    @property
    def num_tokens(self) -> int:
        return self.token_slots.numel()

    @property
    def num_segments(self) -> int:
        return len(self.host_slot_ids)

    @property
    def has_lora(self) -> bool:
        """False for a base-only step: every LoRA op returns at once (early exit)."""
        return self.num_lora_tokens > 0

    @property
    def is_decode(self) -> bool:
        """True when every LoRA segment fits one kernel row tile (few tokens per adapter)."""
        return self.max_lora_segment <= DECODE_MAX_SEGMENT

    @cached_property
    def torch_plan(self) -> TorchPlan:
        """How the torch path groups this step's LoRA tokens; built on first use, then reused."""
        return build_torch_plan(
            self.host_slot_ids, self.host_starts, self.sorted_token_ids.cpu(), self.token_slots.device
        )


def build_lora_meta(token_slots: torch.Tensor, device: torch.device | str | None = None) -> LoraMeta:
    """Group a step's tokens by LoRA slot. Call once per engine step; every layer reuses the result.

    token_slots: [T] integer tensor, slot per token, -1 = base only (any device).
    device: where the index tensors go (default: the device of token_slots).
    """
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
    if token_slots.dtype.is_floating_point or token_slots.dtype == torch.bool:
        raise ValueError(f"token_slots must be an integer tensor, got {token_slots.dtype}")
    device = token_slots.device if device is None else torch.device(device)
    slots = token_slots.to("cpu", torch.int64)  # one host copy per step; all indexing is done here
    if slots.numel() and int(slots.min()) < -1:
        raise ValueError(f"slots must be >= -1, got {int(slots.min())}")
    order = torch.argsort(slots, stable=True)
    slot_ids, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=starts[1:])
    lora_counts = counts[slot_ids >= 0]

    # One host-to-device copy for all five index tensors, then views into it.
    sizes = [slots.numel(), order.numel(), slot_ids.numel(), counts.numel(), starts.numel()]
    packed = torch.cat([slots, order, slot_ids, counts, starts]).to(device=device, dtype=torch.int32)
    token_slots_d, order_d, slot_ids_d, counts_d, starts_d = torch.split(packed, sizes)
    return LoraMeta(
        token_slots=token_slots_d,
        sorted_token_ids=order_d,
        slot_ids=slot_ids_d,
        counts=counts_d,
        starts=starts_d,
        host_slot_ids=tuple(slot_ids.tolist()),
        host_starts=tuple(starts.tolist()),
        num_lora_tokens=int(lora_counts.sum()),
        max_lora_segment=int(lora_counts.max()) if lora_counts.numel() else 0,
    )
