"""Paged KV cache: fixed-size blocks, a block table per sequence, and a prefix cache over the blocks.

Storage per layer is one flat tensor of token slots, `[num_blocks * block_size, kv_heads,
head_dim]`; token `p` of a sequence lives in slot `block_table[p // block_size] * block_size +
p % block_size`. Writes are one `index_put` per layer; reads gather a sequence's slots.

Prefix cache: once a block holds a full block of a sequence's tokens with their K/V computed, it
gets a key (node/engine/prefix_cache.py: a hash chained over the tokens of every block up to it,
starting from the adapter's identity). Blocks are reference counted, so sequences with the same
adapter and prefix share them, and a keyed block whose last sequence ended stays findable by its
key as a free block: a later sequence takes it back instead of computing it again. Allocation
takes never-keyed free blocks first, then the keyed ones least recently freed first (dropping
their keys). Only full, computed blocks are shared, so no sequence ever writes into a shared block.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class BlockAllocator:
    """Reference-counted blocks. Free blocks without a key are handed out lowest id first (keeps
    the touched memory compact), before free keyed blocks (least recently freed first)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._keys: list[bytes | None] = [None] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # never keyed (or key dropped); pop() = lowest id
        self._cached: OrderedDict[int, None] = OrderedDict()  # free and keyed, least recently freed first
        self._by_key: dict[bytes, int] = {}
        self.evictions = 0  # cached blocks handed out again (their prefix dropped)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never-keyed free blocks and cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks kept for the prefix they hold."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"KV cache: {n} blocks requested, {self.num_free} free")
        taken = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently freed cached block
                block, _ = self._cached.popitem(last=False)
                del self._by_key[self._keys[block]]
                self._keys[block] = None
                self.evictions += 1
            self._refs[block] = 1
            taken.append(block)
        return taken

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody uses any more is free again (and, if
        keyed, cached). A sequence's last blocks are freed first, so they are evicted before the
        blocks of the prefix before them."""
        for block in reversed(blocks):
            assert self._refs[block] > 0, f"block {block} freed more often than taken"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._keys[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of `keys` (a sequence's chain)."""
        found = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def share(self, blocks: list[int]) -> None:
        """One more reference to each of these keyed blocks (from lookup), free or in use."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1

    def num_free_among(self, blocks: list[int]) -> int:
        return sum(1 for block in blocks if self._refs[block] == 0)

    def set_key(self, block: int, key: bytes) -> None:
        """Make a block in use, whose K/V are complete, findable under `key`: unless it has a key
        already, or another block holds the same content (two sequences computed it at once)."""
        if self._keys[block] is None and key not in self._by_key:
            self._keys[block] = key
            self._by_key[key] = block


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

    def cached_prefix(self, keys: list[bytes], num_tokens: int) -> list[int]:
        """The cached blocks a new sequence of `num_tokens` tokens, whose full blocks have `keys`,
        can start from. Its last token is always computed (its logits sample the next token), so
        a prompt of whole blocks reuses all but its last block."""
        return self.allocator.lookup(keys[: (num_tokens - 1) // self.block_size])

    def can_admit(self, cached: list[int], num_tokens: int) -> bool:
        """Whether the blocks for `num_tokens` are there, the `cached` prefix blocks reused."""
        missing = self.blocks_needed(num_tokens) - len(cached)
        return missing <= self.allocator.num_free - self.allocator.num_free_among(cached)

    def admit(self, block_table: list[int], cached: list[int], num_tokens: int) -> None:
        """Fill an empty block table: the shared `cached` prefix, then fresh blocks (can_admit first)."""
        assert not block_table
        self.allocator.share(cached)
        block_table.extend(cached)
        block_table.extend(self.allocator.allocate(self.blocks_needed(num_tokens) - len(cached)))

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
