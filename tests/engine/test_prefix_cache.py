"""Prefix caching: the block pool's sharing and eviction, the key chains, and the engine's outputs
with the cache against the engine without it (mixed adapters, eviction, preemption, edits)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path

import pytest
import torch

from node.adapters.peft_format import LoraAdapter
from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine import AsyncEngine, GenerationRequest, SamplingParams
from node.engine.kv_cache import BlockAllocator, KVCache
from node.engine.prefix_cache import adapter_digest, extend_keys, root_key
from node.serving import load_engine

_ids = itertools.count()
CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


# -- the block pool ----------------------------------------------------------------------------------


def test_keyed_blocks_are_shared_and_kept_after_their_sequence():
    a = BlockAllocator(4)
    blocks = a.allocate(3)
    assert blocks == [0, 1, 2]
    for b, key in zip(blocks[:2], (b"k0", b"k1")):
        a.set_key(b, key)
    assert a.lookup([b"k0", b"k1", b"k2"]) == [0, 1]  # the longest prefix
    assert a.lookup([b"k1"]) == [1] and a.lookup([b"x", b"k1"]) == []
    a.share([0, 1])  # a second sequence with the same prefix
    a.free(blocks)
    assert (a.num_free, a.num_cached, a.num_used) == (2, 0, 2)  # block 2 free; 0 and 1 still in use
    a.free([0, 1])
    assert (a.num_free, a.num_cached, a.num_used) == (4, 2, 0)
    assert a.lookup([b"k0", b"k1"]) == [0, 1]  # findable after their last sequence ended
    assert a.num_free_among([0, 1, 2]) == 3
    a.share([0])  # taken back: in use again, no longer free
    assert (a.num_free, a.num_cached) == (3, 1)
    with pytest.raises(AssertionError):
        a.free([3])  # never taken


def test_allocation_takes_plain_blocks_first_then_evicts_the_chain_tail_first():
    a = BlockAllocator(5)
    chain = a.allocate(3)
    for i, b in enumerate(chain):
        a.set_key(b, f"k{i}".encode())
    a.free(chain)  # freed tail first: k2, k1, k0 in eviction order
    assert a.allocate(2) == [3, 4] and a.evictions == 0  # never-keyed blocks first
    assert a.allocate(1) == [2] and a.evictions == 1  # then the chain's tail
    assert a.lookup([b"k0", b"k1", b"k2"]) == [0, 1]  # the prefix before it is still there
    assert a.allocate(2) == [1, 0] and a.lookup([b"k0"]) == []
    with pytest.raises(MemoryError):
        a.allocate(1)


def test_a_key_names_one_block():
    a = BlockAllocator(3)
    x, y = a.allocate(2)
    a.set_key(x, b"same")
    a.set_key(y, b"same")  # computed twice at once: the second copy stays unkeyed
    a.set_key(x, b"other")  # a block keeps its first key
    assert a.lookup([b"same"]) == [x] and a.lookup([b"other"]) == []
    a.free([x, y])
    assert a.num_cached == 1


def test_admission_reuses_all_but_the_last_token_and_counts_free_cached_blocks():
    kv = KVCache(1, 4, 4, 1, 2, torch.float32, torch.device("cpu"))
    first: list[int] = []
    kv.admit(first, [], 8)
    for i, b in enumerate(first):
        kv.allocator.set_key(b, f"k{i}".encode())
    kv.release(first)
    keys = [b"k0", b"k1"]
    assert kv.cached_prefix(keys, 8) == [0]  # 8 tokens: the last one is recomputed, so block 1 is not reused
    assert kv.cached_prefix(keys, 9) == [0, 1]
    # 4 free blocks, 2 of them cached: 16 tokens need 4 blocks, 2 found: 2 more from the other 2
    assert kv.can_admit([0, 1], 16) and not kv.can_admit([0, 1], 17)
    table: list[int] = []
    kv.admit(table, [0, 1], 16)
    assert table[:2] == [0, 1] and kv.allocator.num_free == 0


# -- keys --------------------------------------------------------------------------------------------


def keys_of(root: bytes, tokens: list[int], bs: int = 4) -> list[bytes]:
    keys: list[bytes] = []
    extend_keys(keys, root, tokens, bs, len(tokens) // bs)
    return keys


def test_key_chains():
    base, other = root_key("base:m"), root_key("cid:" + CID)
    tokens = list(range(100, 112))
    k = keys_of(base, tokens)
    assert len(k) == 3 and len(set(k)) == 3
    assert keys_of(base, tokens) == k  # deterministic
    assert not set(keys_of(other, tokens)) & set(k)  # another adapter: no key in common
    changed = keys_of(base, tokens[:5] + [999] + tokens[6:])
    assert changed[0] == k[0] and changed[1] != k[1] and changed[2] != k[2]  # a change reaches every later block
    grown: list[bytes] = k[:1]
    extend_keys(grown, base, tokens, 4, 3)  # extended later, from where it stopped
    assert grown == k


def adapter(name: str, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {(0, "q_proj"): (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))}
    return LoraAdapter(name, 2, 1.0, ("q_proj",), weights)


def test_adapter_identity():
    a, same, edited = adapter("local", 1), adapter("local", 1), adapter("local", 2)
    assert adapter_digest(a) == adapter_digest(same) != adapter_digest(edited)
    assert adapter_digest(a) != adapter_digest(LoraAdapter("local", 2, 2.0, a.target_modules, a.weights))  # scale


# -- the engine, with and without the cache ----------------------------------------------------------


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("prefix-adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    for i in range(4):
        make_random_adapter(
            tiny_model_dir, root / f"ad{i}", rank=4, target_modules=targets, seed=i, std=0.2, base_model=base
        )
    return root


def prompt(n: int, seed: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 390 for i in range(n)]


async def generate(engine: AsyncEngine, model: str | None, ids: list[int], n: int) -> list[int]:
    tokens: list[int] = []
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    async for out in engine.generate(GenerationRequest(f"p{next(_ids)}", ids, sp, model)):
        tokens += out.token_ids
    return tokens


async def serve(settings: Settings, waves: list[list[tuple[str | None, list[int], int]]]):
    """Each wave's requests at once, the waves one after the other; outputs and the engine's stats."""
    engine = load_engine(settings)
    await engine.start()
    try:
        results = [await asyncio.gather(*(generate(engine, m, ids, n) for m, ids, n in wave)) for wave in waves]
        stats = engine.stats() | {
            "evictions": engine.runner.kv.allocator.evictions,
            "preemptions": engine.runner.scheduler.preemptions,
        }
        assert stats["kv_blocks_used"] == 0
        return results, stats
    finally:
        await engine.stop()


def settings(tiny_model_dir, adapters_dir, **kw) -> Settings:
    kw.setdefault("kv_block_size", 4)
    kw.setdefault("max_loras", 4)
    return Settings(model=str(tiny_model_dir), adapters_dir=adapters_dir, **kw)


async def test_mixed_batches_equal_without_the_cache(tiny_model_dir, adapters_dir):
    """Base and adapter requests sharing a 30-token prefix, twice over (the second wave finds the
    first's blocks; prefills of 8 tokens a step, so prefixes are found part computed too)."""
    shared = prompt(30, 1)
    models = [None, "ad0", "ad1", "ad2", "ad0"]
    wave = [(m, shared + prompt(3 + i, 10 + i), 6) for i, m in enumerate(models)]
    waves = [wave, wave[::-1], [(m, shared + prompt(5, 40), 6) for m in models]]
    on, on_stats = await serve(settings(tiny_model_dir, adapters_dir, max_prefill_tokens=32), waves)
    off, off_stats = await serve(
        settings(tiny_model_dir, adapters_dir, max_prefill_tokens=32, prefix_caching=False), waves
    )
    assert on == off
    assert on[1] == on[0][::-1]
    assert on_stats["prefix_cache_hit_tokens"] >= 2 * 5 * 28  # every request of waves 2 and 3 reused 28+ tokens
    assert off_stats["prefix_cache_hit_tokens"] == off_stats["prefix_cache_miss_tokens"] == 0
    assert len({tuple(t) for t in on[2]}) == 4  # the adapters change the outputs (ad0 twice)


async def test_two_adapters_never_share_kv(tiny_model_dir, adapters_dir):
    ids = prompt(41, 3)
    waves = [[("ad0", ids, 4)], [("ad1", ids, 4)], [(None, ids, 4)], [("ad1", ids, 4)]]
    engine = load_engine(settings(tiny_model_dir, adapters_dir))
    await engine.start()
    try:
        hits = []
        for wave in waves:
            before = engine.stats()["prefix_cache_hit_tokens"]
            await generate(engine, *wave[0])
            hits.append(engine.stats()["prefix_cache_hit_tokens"] - before)
    finally:
        await engine.stop()
    assert hits == [0, 0, 0, 40]  # only the same adapter again finds its blocks


async def test_equal_across_eviction_and_preemption(tiny_model_dir, adapters_dir):
    """A pool of 40 blocks of 4 tokens: later waves evict what earlier ones cached, and requests
    growing together preempt each other; outputs stay those of the engine without the cache."""
    waves = [
        [(m, prompt(24, s) + prompt(2, 50 + i), 20) for i, (m, s) in enumerate(zip([None, "ad0", "ad1"], (1, 2, 3)))],
        [(m, prompt(24, s) + prompt(3, 60), 20) for m, s in zip(["ad2", None, "ad3"], (4, 5, 6))],
        [(m, prompt(24, s) + prompt(2, 70), 20) for m, s in zip([None, "ad0", "ad1", "ad3"], (1, 2, 3, 6))],
    ]
    kw = {"num_kv_blocks": 40, "max_num_seqs": 4}
    on, on_stats = await serve(settings(tiny_model_dir, adapters_dir, **kw), waves)
    off, off_stats = await serve(settings(tiny_model_dir, adapters_dir, prefix_caching=False, **kw), waves)
    assert on == off
    assert on_stats["evictions"] > 0 and on_stats["preemptions"] > 0 and off_stats["preemptions"] > 0
    assert on_stats["prefix_cache_hit_tokens"] > 0


async def test_an_edited_local_adapter_does_not_meet_its_old_kv(tiny_model_dir, adapters_dir, tmp_path):
    """A local adapter's directory replaced (another adapter's files) and reloaded: its requests
    find none of the blocks its old weights computed, and answer as the new weights do."""
    local = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "ad0", local / "mine")
    shutil.copytree(adapters_dir / "ad1", local / "other")
    ids = prompt(33, 8)
    engine = load_engine(settings(tiny_model_dir, local, host_adapters=1, max_loras=1))
    await engine.start()
    try:
        old = await generate(engine, "mine", ids, 5)
        await generate(engine, "other", prompt(5, 9), 2)  # the host tier (1 adapter) drops "mine"
        shutil.rmtree(local / "mine")
        shutil.copytree(adapters_dir / "ad2", local / "mine")
        before = engine.stats()["prefix_cache_hit_tokens"]
        new = await generate(engine, "mine", ids, 5)
        assert engine.stats()["prefix_cache_hit_tokens"] == before
        again = await generate(engine, "mine", ids, 5)
        assert engine.stats()["prefix_cache_hit_tokens"] == before + 32  # its new blocks are found
    finally:
        await engine.stop()
    (fresh,), _ = await serve(settings(tiny_model_dir, adapters_dir, prefix_caching=False), [[("ad2", ids, 5)]])
    assert new == again == fresh[0] != old
