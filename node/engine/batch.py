"""The flat token batch of one engine step, with the index tensors attention needs.

Rows are laid out decode first, then prefill chunks. Example with block_size 4: sequences A
(decoding its 6th token, blocks [3, 7]) and B (prefilling 3 prompt tokens, block [0]):

    token_ids    [a5, b0, b1, b2]
    positions    [5, 0, 1, 2]
    slot_mapping [7*4+1, 0, 1, 2]          # where each row's K/V is written
    decode_rows  slice(0, 1); decode_block_tables [[3, 7]]; decode_mask [[1, 1, 1, 1, 1, 1, 0, 0]]
    prefills     [PrefillChunk(start=1, end=4, context_start=0)]
    logit_rows   [0, 3]                    # last row of every sequence that samples
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

P = TypeVar("P")


@dataclass
class PrefillChunk:
    start: int  # first row in the batch
    end: int
    context_start: int  # tokens of this sequence already in the KV cache before this chunk
    context_slots: torch.Tensor | None = None  # [context_start + n] cache slots (when context_start > 0)
    mask: torch.Tensor | None = None  # [n, context_start + n] bool, True = attend


@dataclass(frozen=True)
class StepLora(Generic[P]):
    """The step's LoRA work, prepared once by the slot pool and read by every projection: the
    projection groups that any adapter of the step targets, and the weight layout's plan (its
    type is the layout's: kernel segments for the stacked layout, coefficients for the fused)."""

    groups: frozenset[str]
    plan: P


@dataclass
class StepBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    num_decode: int
    block_size: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillChunk]
    logit_rows: torch.Tensor  # [S]
    lora_slots: torch.Tensor | None = None  # [T] adapter slot per row, -1 = base only; None: no adapter
    lora: StepLora[Any] | None = None  # set by the slot pool's prepare

    @property
    def decode_rows(self) -> slice:
        return slice(0, self.num_decode)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def token_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class SeqWork:
    """One sequence's share of a step: tokens[start:end] of it go through the model."""

    tokens: list[int]
    start: int
    end: int
    block_table: list[int]
    needs_logits: bool
    lora_slot: int = -1


def build_batch(decodes: list[SeqWork], prefills: list[SeqWork], block_size: int, device: torch.device) -> StepBatch:
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    lora: list[int] = []
    logit_rows: list[int] = []
    for w in decodes:
        ids.append(w.tokens[w.start])
        pos.append(w.start)
        slots.extend(token_slots(w.block_table, w.start, w.end, block_size))
        lora.append(w.lora_slot)
        logit_rows.append(len(ids) - 1)
    num_decode = len(decodes)
    decode_tables = decode_mask = None
    if num_decode:
        # whole blocks are gathered (one index per block, not per token); the mask hides the
        # unused tail of each sequence's last block and the padding blocks
        nblk = max(-(-w.end // block_size) for w in decodes)
        tables = torch.zeros(num_decode, nblk, dtype=torch.long)
        lengths = torch.tensor([w.end for w in decodes])
        for b, w in enumerate(decodes):
            used = -(-w.end // block_size)
            tables[b, :used] = torch.tensor(w.block_table[:used])
        mask = torch.arange(nblk * block_size)[None, :] < lengths[:, None]
        decode_tables, decode_mask = tables.to(device), mask[:, None, None, :].to(device)
    chunks: list[PrefillChunk] = []
    for w in prefills:
        start = len(ids)
        ids.extend(w.tokens[w.start : w.end])
        pos.extend(range(w.start, w.end))
        slots.extend(token_slots(w.block_table, w.start, w.end, block_size))
        lora.extend([w.lora_slot] * (w.end - w.start))
        chunk = PrefillChunk(start=start, end=len(ids), context_start=w.start)
        if w.start > 0:
            n = w.end - w.start
            chunk.context_slots = torch.tensor(token_slots(w.block_table, 0, w.end, block_size), device=device)
            # row i (absolute position start+i) sees positions <= start+i
            chunk.mask = torch.ones(n, w.end, dtype=torch.bool, device=device).tril(diagonal=w.start)
        chunks.append(chunk)
        if w.needs_logits:
            logit_rows.append(len(ids) - 1)
    return StepBatch(
        token_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(pos, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode=num_decode,
        block_size=block_size,
        decode_block_tables=decode_tables,
        decode_mask=decode_mask,
        prefills=chunks,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        lora_slots=torch.tensor(lora, dtype=torch.long, device=device) if any(s >= 0 for s in lora) else None,
    )
