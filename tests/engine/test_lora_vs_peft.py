"""Mixed-adapter batches against PEFT, each adapter alone: same greedy tokens, close logits."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import kernels
import kernels.cpu
from node.adapters.peft_format import BaseModelShape, load_adapter
from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine import AsyncEngine, GenerationRequest, SamplingParams
from node.engine.batch import SeqWork, build_batch
from node.engine.kv_cache import KVCache
from node.engine.lora import LoraSlotPool, make_layout
from node.engine.model import LlamaModel
from node.serving import load_engine

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (rank, alpha, target modules, rsLoRA): mixed ranks and targets in one batch
SPECS = [
    (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), False),
    (4, 8, ("q_proj", "v_proj"), False),
    (16, 16, ALL, False),
    (2, 4, ("gate_proj", "up_proj", "down_proj"), False),
    (8, 32, ("o_proj", "down_proj"), True),
    (1, 2, ("k_proj",), False),
    (12, 6, ("q_proj", "up_proj"), False),
    (6, 12, ALL, True),
    (3, 9, ("v_proj", "gate_proj"), False),
]
_ids = itertools.count()


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for i, (rank, alpha, targets, rs) in enumerate(SPECS):
        make_random_adapter(
            tiny_model_dir,
            root / f"ad{i}",
            rank=rank,
            alpha=alpha,
            target_modules=targets,
            seed=i,
            use_rslora=rs,
            std=0.15,
            base_model=base,
        )
    return root


def prompt(n: int, seed: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 390 for i in range(n)]


def peft_greedy(tiny_model_dir: Path, adapter_dir: Path | None, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def peft_logits(tiny_model_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir
    )
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


def _shape(model: LlamaModel, name: str, path: Path) -> BaseModelShape:
    c = model.cfg
    return BaseModelShape(name, (str(path),), c.num_layers, c.hidden_size, c.intermediate_size, c.q_size, c.kv_size)


@pytest.mark.parametrize(
    ("layout", "backend"),
    [("stacked", "native"), ("stacked", "reference"), ("stacked", "triton"), ("fused", None)],
    ids=["stacked-native", "stacked-reference", "stacked-triton", "fused"],
)
def test_mixed_batch_logits_match_peft(tiny_model_dir, adapters_dir, layout, backend):
    """One forward pass: 9 sequences with 9 adapters (mixed ranks/targets) plus a base-only one,
    in every weight layout and, for the stacked one, every kernel backend (native: the CPU path;
    fused: the CPU path without a C compiler; triton: the GPU path, here in Triton's interpreter;
    reference: the torch ops)."""
    if backend == "native" and not kernels.cpu.available():
        pytest.skip(f"{kernels.cpu.unavailable_reason()}")
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton does not import here")
    model = LlamaModel.from_pretrained(tiny_model_dir)
    pool = LoraSlotPool(make_layout(model, len(SPECS), 16, layout=layout, backend=backend))
    model.lora = pool
    assert pool.layout.name == layout
    shape = _shape(model, "tiny", tiny_model_dir)
    kv = KVCache(model.cfg.num_layers, 128, 4, model.cfg.num_kv_heads, model.cfg.head_dim, model.dtype, model.device)
    works, names = [], []
    for i in range(len(SPECS) + 1):
        ids = prompt(5 + i, i)
        table: list[int] = []
        kv.grow(table, len(ids))
        slot = -1
        if i < len(SPECS):
            names.append(f"ad{i}")
            slot = pool.acquire(load_adapter(adapters_dir / f"ad{i}", f"ad{i}", shape, max_rank=16))
        works.append(SeqWork(ids, 0, len(ids), table, True, lora_slot=slot))
    batch = build_batch([], works, 4, model.device)
    pool.prepare(batch)
    logits = model.forward(batch, kv.k, kv.v)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for i, w in enumerate(works):
        if i < len(SPECS):
            ref = peft_logits(tiny_model_dir, adapters_dir / names[i], w.tokens)[-1]
        else:
            with torch.no_grad():
                ref = base(torch.tensor([w.tokens])).logits[0, -1]
        assert (logits[i] - ref).abs().max().item() < 1e-4, f"sequence {i}"
    # the adapters really change the output
    assert (logits[0] - base(torch.tensor([works[0].tokens])).logits[0, -1]).abs().max().item() > 1e-2


async def _generate(engine: AsyncEngine, model: str | None, ids: list[int], n: int) -> list[int]:
    tokens: list[int] = []
    req = GenerationRequest(f"p{next(_ids)}", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), model)
    async for out in engine.generate(req):
        tokens += out.token_ids
    return tokens


@pytest.mark.parametrize("max_loras", [len(SPECS), 3], ids=["all-resident", "eviction-pressure"])
async def test_engine_mixed_batch_matches_peft_alone(tiny_model_dir, adapters_dir, max_loras):
    settings = Settings(model=str(tiny_model_dir), adapters_dir=adapters_dir, max_loras=max_loras, kv_block_size=4)
    engine = load_engine(settings)
    await engine.start()
    try:
        jobs = [(f"ad{i}", prompt(6 + i, 10 + i), 12) for i in range(len(SPECS))]
        jobs += [(None, prompt(7, 50), 12), (engine.model_name, prompt(9, 51), 12)]
        jobs += [(f"ad{i}", prompt(8, 60 + i), 10) for i in (0, 2, 4)]  # the same adapter twice in a batch
        results = await asyncio.gather(*(_generate(engine, m, ids, n) for m, ids, n in jobs))
        assert engine.stats()["kv_blocks_used"] == 0
        if max_loras < len(SPECS):
            assert engine.runner.lora_pool.loads > max_loras  # adapters were evicted and reloaded
    finally:
        await engine.stop()
    for (name, ids, n), got in zip(jobs, results):
        adapter = None if name in (None, engine.model_name) else adapters_dir / name
        assert got == peft_greedy(tiny_model_dir, adapter, ids, n), name
    assert results[0] != results[len(SPECS)]  # sanity: adapters change outputs
