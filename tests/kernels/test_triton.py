"""Triton kernels against the torch reference, on CPU through TRITON_INTERPRET=1 (see conftest).

Interpreted programs run one by one in Python, so the shapes stay small: odd sizes (1, 6, 42, 123
tokens; hidden 40 and 72) that leave partial tiles everywhere, and configs shrunk (BLOCK_N 16,
BLOCK_K 16/32) so that one problem spans several row, column, rank and K tiles.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import reference
from tests.kernels.cases import assert_close, make_problem, oracle_shrink

expand = pytest.importorskip("kernels.expand")
shrink = pytest.importorskip("kernels.shrink")

SMALL_SHRINK = {"BLOCK_K": 16, "BLOCK_R": 16}
SMALL_EXPAND = {"BLOCK_N": 16}
QKV, GATE_UP, SINGLE = (24, 8, 8), (16, 16), (20,)
RANKS = [16, 8, 4, 16, 12, 1, 16, 8]  # 8 slots of max rank 16; most get no token in a small case


def random_slots(num_tokens: int, num_slots: int, base_share: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [-1 if rng.random() < base_share else rng.randrange(num_slots) for _ in range(num_tokens)]


CASES = {
    "one token": [3],
    "6 decode tokens, a base one": [5, 0, -1, 2, 7, 3],
    "42 mixed, sorted runs": [1] * 20 + [-1] * 4 + [6] * 11 + [0, 3, 3, 2, 5, 5, 4],
    "123 random": random_slots(123, 8, 0.2, seed=1),
    "all one adapter": [2] * 42,
}


def check_add_lora(
    slots: list[int], slices: tuple[int, ...], dtype: torch.dtype, hidden: int = 40, **cfg: dict
) -> None:
    p = make_problem(slots, slices, hidden=hidden, ranks=RANKS, max_rank=16, dtype=dtype)
    t_ref = reference.lora_shrink(p.x, p.A, p.meta, p.ranks)
    t = shrink.lora_shrink(p.x, p.A, p.meta, p.ranks, config=cfg.get("shrink", SMALL_SHRINK))
    assert t.dtype == torch.float32
    assert_close(t, t_ref, dtype)
    # feed both expands the exact t, so the comparison isolates the expand
    t_exact = oracle_shrink(p).float()
    y_ref, y = p.y.clone(), p.y.clone()
    reference.lora_expand(y_ref, t_exact, p.B, p.meta, p.scales, p.ranks, p.slice_offsets)
    expand.lora_expand(
        y, t_exact, p.B, p.meta, p.scales, p.ranks, p.slice_offsets, config=cfg.get("expand", SMALL_EXPAND)
    )
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("slices", [QKV, GATE_UP, SINGLE], ids=["qkv", "gate_up", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference_fp32(case: str, slices: tuple[int, ...]) -> None:
    check_add_lora(CASES[case], slices, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["6 decode tokens, a base one", "42 mixed, sorted runs"])
def test_kernels_match_reference_half(case: str, dtype: torch.dtype) -> None:
    check_add_lora(CASES[case], QKV, dtype)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_split_k(split: int) -> None:
    """hidden 72 = 4.5 K blocks of 16: splits of 2/3 blocks, the last one partial."""
    cfg = {"shrink": {"BLOCK_K": 16, "BLOCK_R": 16, "SPLIT_K": split}}
    check_add_lora(CASES["6 decode tokens, a base one"], QKV, torch.float32, hidden=72, **cfg)


def test_rank_blocks_skip_past_rank() -> None:
    """Max rank 64 in blocks of 16: a rank-8 slot runs one block, the others return at once."""
    p = make_problem([0, 1, 1, 2, -1], GATE_UP, hidden=40, ranks=[64, 8, 33], max_rank=64)
    t = shrink.lora_shrink(p.x, p.A, p.meta, p.ranks, config=SMALL_SHRINK)
    assert_close(t, oracle_shrink(p), torch.float32)


def test_prefill_config_with_several_row_tiles() -> None:
    """A prefill-like step (segments > 16 tokens) with 16-row tiles: 3 tiles on the longest."""
    slots = [4] * 37 + [-1] * 3 + [1] * 17 + [0]
    cfg = {"shrink": {"BLOCK_M": 16, "BLOCK_K": 32}, "expand": {"BLOCK_M": 16, "BLOCK_N": 16}}
    check_add_lora(slots, QKV, torch.float32, **cfg)


def test_base_only_step_is_an_early_exit() -> None:
    p = make_problem([-1] * 5, QKV, hidden=40, ranks=RANKS, max_rank=16)
    assert not shrink.lora_shrink(p.x, p.A, p.meta, p.ranks).any()
    y = p.y.clone()
    expand.lora_expand(y, torch.ones(5, 3, 16), p.B, p.meta, p.scales, p.ranks, p.slice_offsets)
    assert torch.equal(y, p.y)


def test_launchers_check_layout() -> None:
    p = make_problem([0, 1], QKV, hidden=40, ranks=RANKS, max_rank=16)
    with pytest.raises(ValueError):
        shrink.lora_shrink(p.x.T.contiguous().T, p.A, p.meta, p.ranks)  # column-major x
    with pytest.raises(TypeError):
        shrink.lora_shrink(p.x, p.A, p.meta, p.ranks.long())
    t = oracle_shrink(p).float()
    with pytest.raises(ValueError):
        expand.lora_expand(
            p.y, t, p.B.transpose(1, 2).contiguous().transpose(1, 2), p.meta, p.scales, p.ranks, p.slice_offsets
        )
    with pytest.raises(TypeError):
        expand.lora_expand(p.y, t, p.B, p.meta, p.scales.double(), p.ranks, p.slice_offsets)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [6, 42, 123, 431])
@pytest.mark.parametrize("slices", [QKV, GATE_UP, SINGLE], ids=["qkv", "gate_up", "single"])
def test_kernels_grid_slow(slices: tuple[int, ...], num_tokens: int, dtype: torch.dtype) -> None:
    check_add_lora(random_slots(num_tokens, 8, 0.15, seed=num_tokens), slices, dtype, hidden=72)
