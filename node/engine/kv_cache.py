"""Paged KV cache: fixed-size blocks, a block table per sequence, blocks freed when it ends.

Storage per layer is one flat tensor of token slots, `[num_blocks * block_size, kv_heads,
head_dim]`; token `p` of a sequence lives in slot `block_table[p // block_size] * block_size +
p % block_size`. Writes are one `index_put` per layer; reads gather a sequence's slots.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Free list of block ids. Lowest ids are handed out first (keeps the touched memory compact)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} blocks requested, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` to hold `num_tokens`; False (and unchanged) if blocks ran out."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if missing > self.allocator.num_free:
            return False
        block_table.extend(self.allocator.allocate(missing))
        return True

    def release(self, block_table: list[int]) -> None:
        self.allocator.free(block_table)
        block_table.clear()
