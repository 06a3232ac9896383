"""Block allocator, incremental detokenizer and sampler units."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from node.engine.detokenizer import IncrementalDetokenizer
from node.engine.kv_cache import BlockAllocator, KVCache
from node.engine.sampling import make_generator, sample
from node.engine.types import SamplingParams


def test_allocator_hands_out_and_takes_back_blocks():
    a = BlockAllocator(5)
    first = a.allocate(3)
    assert first == [0, 1, 2] and a.num_free == 2
    with pytest.raises(MemoryError):
        a.allocate(3)
    a.free(first)
    assert a.num_free == 5 and sorted(a.allocate(5)) == [0, 1, 2, 3, 4]


def test_kv_grow_is_all_or_nothing():
    kv = KVCache(1, 3, 4, 1, 2, torch.float32, torch.device("cpu"))
    table: list[int] = []
    assert kv.grow(table, 5) and len(table) == 2
    assert kv.grow(table, 8) and len(table) == 2
    assert not kv.grow(table, 13) and len(table) == 2
    kv.release(table)
    assert table == [] and kv.allocator.num_free == 3


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_detokenizer_streams_multibyte_characters_whole(tokenizer):
    text = "Ünïcödé 🙂 中文 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.push([i])[0] for i in ids]
    assert "".join(pieces) + d.flush() == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("stop", ["capital", "s P", "Rome.", "zzz"])
def test_detokenizer_stop_strings(tokenizer, stop):
    text = "The capital of France is Paris. The capital of Italy is Rome."
    d = IncrementalDetokenizer(tokenizer, (stop, "never-there"))
    out, hit = "", False
    for i in tokenizer.encode(text, add_special_tokens=False):
        piece, hit = d.push([i])
        out += piece
        if hit:
            break
    if stop in text:
        assert hit and out == text[: text.index(stop)]
    else:
        assert not hit and out + d.flush() == text


def test_sampler_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seen_k, seen_p = set(), set()
    for seed in range(300):
        pk = SamplingParams(temperature=1.0, top_k=2, seed=seed)
        seen_k.update(sample(logits, [pk], [make_generator(pk)]))
        # softmax: [0.64, 0.24, 0.09, ...]: top_p 0.8 keeps the first two tokens only
        pp = SamplingParams(temperature=1.0, top_p=0.8, seed=seed)
        seen_p.update(sample(logits, [pp], [make_generator(pp)]))
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}


def test_sampler_temperature_zero_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[1, [7, 30]] = 100.0  # a tie: the first maximum wins, as argmax has it
    logits[2] = 0.0
    logits[3, 12] = float("nan")  # NaN wins, as in argmax
    p = SamplingParams(temperature=0)
    assert sample(logits, [p] * 6, [None] * 6) == logits.argmax(-1).tolist()
    assert sample(logits, [p] * 6, [None] * 6)[1:4] == [7, 0, 12]


@pytest.mark.parametrize("stops", [("5", ", 5"), (", 5", "5")])
def test_detokenizer_earliest_stop_string_wins(tokenizer, stops):
    text = "1, 2, 3, 4, 5, 6"
    d = IncrementalDetokenizer(tokenizer, stops)
    out = ""
    for i in tokenizer.encode(text, add_special_tokens=False):
        piece, hit = d.push([i])
        out += piece
        if hit:
            break
    assert hit and out == "1, 2, 3, 4"
