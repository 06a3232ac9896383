"""The torch reference (CPU path and kernel oracle) against the naive float64 per-token loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference
from kernels.plan import LONG_SEGMENT
from tests.kernels.cases import assert_close, make_problem, oracle_expand, oracle_shrink

QKV = (24, 8, 8)  # SmolLM2's q/k/v ratio (576, 192, 192), scaled down
L = LONG_SEGMENT
DEFAULT_FEW = (reference.FEW_SHORT_FP32, reference.FEW_SHORT_HALF)
CASES = {
    "decode, distinct adapters": [3, -1, 0, 2, 5, 6, -1, 1],
    "decode, shared adapters": [2, 2, 0, 2, -1, 0, 4, 4, 4],
    "prefill chunks": [1] * (2 * L) + [-1] * 3 + [4] * L,
    "prefill, one adapter split by a base sequence": [6] * L + [-1] * 2 + [6] * L,
    "mixed prefill and decode": [1] * (L + 3) + [0, 3, 3, -1, 5] + [6] * L,
    "sparse slots": [0, 6, 6, 0],
    "one token": [4],
    "all one adapter": [2] * 42,
}
RANKS = [16, 8, 4, 16, 12, 1, 16]  # mixed ranks, max rank 16


@pytest.fixture(params=["loop", "batched"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run short segments one by one, or packed into one batched matmul."""
    few = 10**9 if request.param == "loop" else 0
    monkeypatch.setattr(reference, "FEW_SHORT_FP32", few)
    monkeypatch.setattr(reference, "FEW_SHORT_HALF", few)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slices", [QKV, (16, 16), (24,)], ids=["qkv", "gate_up", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_add_lora_matches_oracle(case: str, slices: tuple[int, ...], dtype: torch.dtype, strategy: str) -> None:
    p = make_problem(CASES[case], slices, hidden=40, ranks=RANKS, max_rank=16, dtype=dtype)
    want = oracle_expand(p, oracle_shrink(p))
    y = p.y.clone()
    reference.shrink_expand(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert_close(y, want, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_shrink_zeroes_base_tokens_and_columns_past_rank(case: str, strategy: str) -> None:
    p = make_problem(CASES[case], QKV, hidden=40, ranks=RANKS, max_rank=16)
    t = reference.lora_shrink(p.x, p.A, p.meta, p.ranks)
    assert t.dtype == torch.float32 and t.shape == (len(CASES[case]), 3, 16)
    assert_close(t, oracle_shrink(p), torch.float32)  # the oracle is exactly 0 there


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_ignores_t_past_rank(dtype: torch.dtype, strategy: str) -> None:
    p = make_problem(CASES["mixed prefill and decode"], QKV, hidden=40, ranks=RANKS, max_rank=16, dtype=dtype)
    t = oracle_shrink(p).float()
    want = oracle_expand(p, t)
    t_dirty = t + 100.0  # what lies past a slot's rank, or on base-only tokens, must not matter
    for tok, s in enumerate(p.slots.tolist()):
        if s >= 0:
            t_dirty[tok, :, : int(p.ranks[s])] = t[tok, :, : int(p.ranks[s])]
    y = p.y.clone()
    reference.lora_expand(y, t_dirty, p.B, p.meta, p.scales, p.ranks, p.slice_offsets)
    assert_close(y, want, dtype)


def test_base_only_step_leaves_y_untouched() -> None:
    p = make_problem([-1] * 6, QKV, hidden=40, ranks=RANKS, max_rank=16)
    y = p.y.clone()
    reference.shrink_expand(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert torch.equal(y, p.y)
    assert not reference.lora_shrink(p.x, p.A, p.meta, p.ranks).any()


def test_rejects_mismatched_arguments() -> None:
    p = make_problem([0, 1], QKV, hidden=40, ranks=RANKS, max_rank=16)
    with pytest.raises(ValueError):
        reference.lora_shrink(p.x[:1], p.A, p.meta, p.ranks)
    with pytest.raises(TypeError):
        reference.lora_shrink(p.x.bfloat16(), p.A, p.meta, p.ranks)
    t = reference.lora_shrink(p.x, p.A, p.meta, p.ranks)
    with pytest.raises(ValueError):
        reference.lora_expand(p.y, t, p.B, p.meta, p.scales, p.ranks, (0, 24, 40))
    with pytest.raises(TypeError):
        reference.lora_expand(p.y, t.double(), p.B, p.meta, p.scales, p.ranks, p.slice_offsets)


@settings(max_examples=60, deadline=None)
@given(
    slots=st.lists(st.integers(-1, 9), min_size=1, max_size=40),
    ranks=st.lists(st.integers(1, 8), min_size=10, max_size=10),
    slices=st.sampled_from([(5,), (6, 6), (7, 3, 3)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_add_lora_property(
    slots: list[int], ranks: list[int], slices: tuple[int, ...], dtype: torch.dtype, seed: int
) -> None:
    """Any slot assignment, both strategies (short segments looped or packed, sometimes with one
    long run appended), dense and scattered slots."""
    few = 10**9 if seed % 3 == 0 else 0
    reference.FEW_SHORT_FP32, reference.FEW_SHORT_HALF = few, few
    slots = slots + [slots[0]] * (seed % (2 * L))
    p = make_problem(slots, slices, hidden=11, ranks=ranks, max_rank=8, dtype=dtype, seed=seed)
    y = p.y.clone()
    try:
        reference.shrink_expand(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    finally:
        reference.FEW_SHORT_FP32, reference.FEW_SHORT_HALF = DEFAULT_FEW
    assert_close(y, oracle_expand(p, oracle_shrink(p)), dtype)
