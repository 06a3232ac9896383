"""Our Llama forward pass against transformers' LlamaForCausalLM on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.engine.batch import SeqWork, build_batch
from node.engine.kv_cache import KVCache
from node.engine.model import LlamaModel
from tests.conftest import build_tiny_model

TOL = 1e-4


def _cache(model: LlamaModel, blocks: int = 64, block_size: int = 4) -> KVCache:
    c = model.cfg
    return KVCache(c.num_layers, blocks, block_size, c.num_kv_heads, c.head_dim, model.dtype, model.device)


def _reference_logits(path, ids: list[int]) -> torch.Tensor:
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _prefill_then_decode(model: LlamaModel, ids: list[int], split: int, block_size: int = 4) -> torch.Tensor:
    """Logits for every position >= split-1: prefill ids[:split], then decode the rest one by one."""
    kv = _cache(model, block_size=block_size)
    table: list[int] = []
    kv.grow(table, len(ids))
    rows = [model.forward(build_batch([], [SeqWork(ids, 0, split, table, True)], block_size, model.device), kv.k, kv.v)]
    for p in range(split, len(ids)):
        batch = build_batch([SeqWork(ids, p, p + 1, table, True)], [], block_size, model.device)
        rows.append(model.forward(batch, kv.k, kv.v))
    return torch.cat(rows)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 4},  # MHA
        {"num_key_value_heads": 1},  # MQA
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
        {"attention_bias": True, "mlp_bias": True},
    ],
    ids=["gqa-tied", "untied", "mha", "mqa", "llama3-rope", "linear-rope", "bias"],
)
def test_tiny_logits_match_transformers(tmp_path, overrides):
    path = build_tiny_model(tmp_path / "m", seed=1, **overrides)
    model = LlamaModel.from_pretrained(path)
    ids = _prompt(40, seed=2, vocab=model.cfg.vocab_size)
    ref = _reference_logits(path, ids)
    ours = _prefill_then_decode(model, ids, split=29)
    assert ours.shape == ref[28:].shape
    assert (ours - ref[28:]).abs().max().item() < TOL


def test_chunked_prefill_matches_whole_prefill(tiny_model_dir):
    model = LlamaModel.from_pretrained(tiny_model_dir)
    ids = _prompt(37, seed=3, vocab=model.cfg.vocab_size)
    ref = _reference_logits(tiny_model_dir, ids)
    kv = _cache(model)
    table: list[int] = []
    kv.grow(table, len(ids))
    for start, end in [(0, 10), (10, 11), (11, 30)]:
        model.forward(build_batch([], [SeqWork(ids, start, end, table, False)], 4, model.device), kv.k, kv.v)
    last = model.forward(build_batch([], [SeqWork(ids, 30, 37, table, True)], 4, model.device), kv.k, kv.v)
    assert (last[0] - ref[-1]).abs().max().item() < TOL


def test_reserved_rows_keep_the_model_exact(tiny_model_dir):
    """reserve_rows (the fused LoRA layout's storage): the model reads its weight in place from
    the buffer's first N rows, whatever is written in the spare rows below."""
    model = LlamaModel.from_pretrained(tiny_model_dir)
    ids = _prompt(11, seed=8, vocab=model.cfg.vocab_size)
    before = [lw.qkv.clone() for lw in model.layers]
    buffers = model.reserve_rows("qkv", 5)
    for lw, buffer, w in zip(model.layers, buffers, before):
        N = w.shape[0]
        assert buffer.shape == (N + 5, w.shape[1]) and not buffer[N:].any()
        assert torch.equal(lw.qkv, w) and lw.qkv.data_ptr() == buffer.data_ptr()
        buffer[N:] = 7.0
    kv = _cache(model)
    table: list[int] = []
    kv.grow(table, len(ids))
    logits = model.forward(build_batch([], [SeqWork(ids, 0, len(ids), table, True)], 4, model.device), kv.k, kv.v)
    assert (logits[0] - _reference_logits(tiny_model_dir, ids)[-1]).abs().max().item() < TOL


def test_mixed_batch_rows_match_separate_runs(tiny_model_dir):
    """Decodes of two sequences and the prefill of a third in one forward pass."""
    model = LlamaModel.from_pretrained(tiny_model_dir)
    vocab = model.cfg.vocab_size
    a, b, c = _prompt(9, 4, vocab), _prompt(21, 5, vocab), _prompt(14, 6, vocab)
    kv = _cache(model)
    tables: list[list[int]] = [[], [], []]
    for t, ids in zip(tables, (a, b, c)):
        kv.grow(t, len(ids))
    for t, ids in ((tables[0], a), (tables[1], b)):
        model.forward(build_batch([], [SeqWork(ids, 0, len(ids) - 1, t, False)], 4, model.device), kv.k, kv.v)
    batch = build_batch(
        [SeqWork(a, 8, 9, tables[0], True), SeqWork(b, 20, 21, tables[1], True)],
        [SeqWork(c, 0, 14, tables[2], True)],
        4,
        model.device,
    )
    logits = model.forward(batch, kv.k, kv.v)
    for row, ids in enumerate((a, b, c)):
        assert (logits[row] - _reference_logits(tiny_model_dir, ids)[-1]).abs().max().item() < TOL


def test_smollm2_logits_match_transformers(smollm2_dir):
    model = LlamaModel.from_pretrained(smollm2_dir)
    ids = _prompt(48, seed=7, vocab=model.cfg.vocab_size)
    ref = _reference_logits(smollm2_dir, ids)
    ours = _prefill_then_decode(model, ids, split=40, block_size=16)
    assert (ours - ref[39:]).abs().max().item() < TOL


def test_bf16_logits_close_to_transformers_bf16(tiny_model_dir):
    """bf16 (the default on CPUs with AMX / AVX512-BF16): same math as transformers in bf16."""
    model = LlamaModel.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ids = _prompt(24, seed=8, vocab=model.cfg.vocab_size)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    ours = _prefill_then_decode(model, ids, split=20)
    fp32 = _reference_logits(tiny_model_dir, ids)[19:]
    # bf16 keeps ~3 significant digits: compare with the scale of the logits, and against fp32
    assert (ours - expected[19:]).abs().max().item() < 0.05 * fp32.abs().max().item()
    assert (ours.argmax(-1) == fp32.argmax(-1)).float().mean().item() >= 0.8


def test_auto_dtype_is_bf16_only_where_native():
    from node.config import Settings
    from node.engine.async_engine import resolve_dtype

    assert resolve_dtype(Settings(dtype="float32")) is torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_dtype(Settings(dtype="auto")) is (torch.bfloat16 if native else torch.float32)
