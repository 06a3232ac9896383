"""Keys of the prefix cache: which K/V a block holds, named by content.

A block's K/V depend on the model, the adapter and every token up to the block's end, so its key
is a hash chain over full blocks of tokens that starts from the adapter's identity:

    root   = sha256("openlora-kv-prefix" 0x00 identity)
    key[0] = sha256(root     + tokens[0:bs] as little-endian uint32)
    key[i] = sha256(key[i-1] + tokens[i*bs:(i+1)*bs] ...)

The identity of an adapter is its CID when it came from a content-addressed source (`LoraAdapter.cid`,
set by the node's adapter manager: a re-published adapter has a new CID and never meets the KV of
the old one), else a sha256 of its weights and scaling (a local directory's adapter, even one named
like a CID, reloaded after an edit, gets a new identity); the base model's is its name. Two adapters therefore never share a block. SHA-256, not a fast
non-cryptographic hash: a request that could forge a collision would read another's K/V.
"""

from __future__ import annotations

import hashlib
import struct

from node.adapters.peft_format import LoraAdapter


def root_key(identity: str) -> bytes:
    return hashlib.sha256(b"openlora-kv-prefix\x00" + identity.encode()).digest()


def extend_keys(keys: list[bytes], root: bytes, tokens: list[int], block_size: int, num_blocks: int) -> None:
    """Append the keys of full blocks len(keys) .. num_blocks - 1 of `tokens` to `keys`."""
    parent = keys[-1] if keys else root
    for i in range(len(keys), num_blocks):
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}I", *block)).digest()
        keys.append(parent)


def adapter_digest(adapter: LoraAdapter) -> str:
    """A sha256 of what the adapter's updates are made of: rank, scale, targets, weights (~2 ms
    for a rank-8 q/k/v/o SmolLM2 adapter; the caller keeps it per adapter object)."""
    h = hashlib.sha256(repr((adapter.rank, adapter.scale, sorted(adapter.target_modules))).encode())
    for key in sorted(adapter.weights):
        h.update(repr(key).encode())
        for t in adapter.weights[key]:
            h.update(memoryview(t.detach().contiguous().cpu().numpy()).cast("B"))
    return h.hexdigest()
