"""The native CPU kernel (kernels.cpu) against the naive float64 oracle, and its bad paths."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.cpu
from kernels import build_lora_meta
from kernels.plan import LONG_SEGMENT
from tests.kernels.cases import Problem, assert_close, make_problem, oracle_expand, oracle_shrink
from tests.kernels.test_reference import CASES, QKV, RANKS

needs_kernel = pytest.mark.skipif(not kernels.cpu.available(), reason=f"{kernels.cpu.unavailable_reason()}")


def test_builds_where_there_is_a_compiler() -> None:
    """CI machines have gcc: the kernel must build there, not quietly fall back."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here")
    assert kernels.cpu.available(), kernels.cpu.unavailable_reason()


def test_uses_what_the_cpu_has() -> None:
    """On a CPU with AVX512-BF16 / AMX (the CI machines have both) the fast paths are built and
    used, so the tests below cover them rather than only the portable C."""
    if not kernels.cpu.available():
        pytest.skip(f"{kernels.cpu.unavailable_reason()}")
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    want = {name for flag, name in (("avx512_bf16", "avx512-bf16"), ("amx_bf16", "amx")) if flag in flags}
    assert want <= kernels.cpu.features()


def transposed_B(p: Problem) -> torch.Tensor:
    """B [S, N, R] as a view of [S, R, N] storage: the engine's layout (expand along contiguous columns)."""
    return p.B.transpose(1, 2).contiguous().transpose(1, 2)


def run(p: Problem, B: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    y = p.y.clone()
    weights = kernels.cpu.LoraWeights(p.A, p.B if B is None else B, p.scales, p.ranks, p.slice_offsets)
    kernels.cpu.apply(y, p.x, weights, kernels.cpu.LoraSegments(p.meta, threads))
    return y


@needs_kernel
@pytest.mark.parametrize("layout", ["engine", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slices", [QKV, (16, 16), (24,)], ids=["qkv", "gate_up", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_add_lora_matches_oracle(case: str, slices: tuple[int, ...], dtype: torch.dtype, layout: str) -> None:
    """Mixed ranks (weights past each rank are garbage), slot -1, decode and prefill segments, an
    odd hidden size (vector tails); B as the engine stores it and as the kernels' stacked layout."""
    p = make_problem(CASES[case], slices, hidden=40, ranks=RANKS, max_rank=16, dtype=dtype)
    y = run(p, transposed_B(p) if layout == "engine" else p.B)
    assert_close(y, oracle_expand(p, oracle_shrink(p)), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_sizes(dtype: torch.dtype) -> None:
    """SmolLM2's q/k/v (576 -> 576/192/192) at decode (32 tokens, 16 adapters) and a wide
    projection (1536 -> 1100, more columns than one expand chunk) at prefill."""
    decode = make_problem([t % 16 for t in range(32)], (576, 192, 192), 576, [8] * 16, 8, dtype)
    prefill = make_problem([0] * 40 + [-1] * 5 + [2] * 37, (1100,), 1536, [16, 4, 8], 16, dtype, seed=1)
    for p in (decode, prefill):
        assert_close(run(p, transposed_B(p)), oracle_expand(p, oracle_shrink(p)), dtype)


AMX_SLOTS = (
    [0] * 50 + [-1] * 3 + [1] * 37 + [5, 2, 5] + [2] * 16 + [3] * 33  # long segments, tails of 1-15 tokens
    + [4] * 20 + [-1] + [4] * 20  # one adapter split by another row: not 16 consecutive rows everywhere
    + [0] * 40  # a second run of slot 0: one segment, two runs
)  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("slices", [QKV, (40,), (17, 33)], ids=["qkv", "single", "odd"])
def test_long_segments_match_oracle(slices: tuple[int, ...], hidden: int) -> None:
    """Prefill-sized segments with H a multiple of 32: on CPUs with AMX these run on tiles (ranks
    past 16 and 32, slices not a multiple of 16 wide); elsewhere on the vector path."""
    p = make_problem(AMX_SLOTS, slices, hidden=hidden, ranks=[16, 1, 5, 17, 33, 8], max_rank=40, dtype=torch.bfloat16)
    want = oracle_expand(p, oracle_shrink(p))
    for B in (transposed_B(p), p.B):  # the engine's layout (tiles), and the stacked one (vector path)
        assert_close(run(p, B), want, torch.bfloat16)
        assert torch.equal(run(p, B, threads=1), run(p, B, threads=2))


@needs_kernel
def test_tiles_only_take_rows_in_order() -> None:
    """A segment's rows out of batch order (a hand-made meta) must not be taken for 16
    consecutive rows: each row gets its update exactly once."""
    p = make_problem([0] * 40, QKV, hidden=64, ranks=[8], max_rank=8, dtype=torch.bfloat16)
    order = list(range(40))
    order[1], order[35] = order[35], order[1]
    sorted_ids = torch.tensor(order, dtype=torch.int32)
    p.meta = dataclasses.replace(p.meta, sorted_token_ids=sorted_ids)
    assert_close(run(p, transposed_B(p)), oracle_expand(p, oracle_shrink(p)), torch.bfloat16)


@needs_kernel
def test_base_only_rows_are_untouched_and_threads_agree() -> None:
    slots = [3, -1, 0, 2, 5, 6, -1, 1] + [4] * LONG_SEGMENT
    p = make_problem(slots, QKV, hidden=40, ranks=RANKS, max_rank=16, dtype=torch.bfloat16)
    one, two = run(p, threads=1), run(p, threads=2)
    assert torch.equal(one, two)  # every token is one thread's work: the split does not change a bit
    base = torch.tensor(slots) < 0
    assert torch.equal(one[base], p.y[base])
    assert not torch.equal(one[~base], p.y[~base])


@needs_kernel
def test_base_only_step_and_strided_rows() -> None:
    p = make_problem([-1] * 6, QKV, hidden=40, ranks=RANKS, max_rank=16)
    assert torch.equal(run(p), p.y)
    # y and x as views with a row stride wider than their width (the kernel takes row strides)
    p = make_problem([1, 0, 1, 4], QKV, hidden=40, ranks=RANKS, max_rank=16)
    y_wide, x_wide = torch.zeros(4, 60), torch.zeros(4, 45)
    y_wide[:, :40], x_wide[:, :40] = p.y, p.x
    y = y_wide[:, :40]
    kernels.add_lora(y, x_wide[:, :40], p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta, backend="native")
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)
    assert not y_wide[:, 40:].any()


@needs_kernel
def test_packed_weights_see_later_writes() -> None:
    """The engine packs a layer's weights once; slots loaded afterwards must be read."""
    p = make_problem([0, 1, 1], QKV, hidden=40, ranks=RANKS, max_rank=16)
    A, B = torch.zeros_like(p.A), torch.zeros_like(p.B)
    packed = kernels.cpu.LoraWeights(A, B, p.scales, p.ranks, p.slice_offsets)
    A.copy_(p.A)
    B.copy_(p.B)
    y = p.y.clone()
    kernels.cpu.apply(y, p.x, packed, kernels.cpu.LoraSegments(p.meta))
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    slots=st.lists(st.integers(-1, 9), min_size=1, max_size=40),
    ranks=st.lists(st.integers(1, 8), min_size=10, max_size=10),
    slices=st.sampled_from([(5,), (6, 6), (7, 3, 3), (33, 17)]),
    hidden=st.sampled_from([1, 11, 32, 67]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_add_lora_property(
    slots: list[int], ranks: list[int], slices: tuple[int, ...], hidden: int, dtype: torch.dtype, seed: int
) -> None:
    slots = slots + [slots[0]] * (seed % 20)  # sometimes a long run: blocks of several tokens
    p = make_problem(slots, slices, hidden=hidden, ranks=ranks, max_rank=8, dtype=dtype, seed=seed)
    assert_close(run(p, transposed_B(p) if seed % 2 else p.B), oracle_expand(p, oracle_shrink(p)), dtype)


@needs_kernel
def test_rejects_bad_arguments() -> None:
    p = make_problem([0, 1], QKV, hidden=40, ranks=RANKS, max_rank=16)
    packed = kernels.cpu.LoraWeights(p.A, p.B, p.scales, p.ranks, p.slice_offsets)
    seg = kernels.cpu.LoraSegments(p.meta)
    with pytest.raises(TypeError, match="CPU"):
        kernels.cpu.apply(p.y.bfloat16(), p.x, packed, seg)
    with pytest.raises(ValueError, match="must be"):
        kernels.cpu.apply(p.y[:, :39], p.x, packed, seg)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.cpu.apply(p.y.t().contiguous().t(), p.x, packed, seg)
    with pytest.raises(ValueError, match="must be"):
        kernels.cpu.apply(p.y[:1], p.x[:1], packed, seg)  # fewer tokens than the step
    with pytest.raises(ValueError):
        kernels.cpu.LoraWeights(p.A[0], p.B, p.scales, p.ranks, p.slice_offsets)
    with pytest.raises(ValueError, match="slice_offsets"):
        kernels.cpu.LoraWeights(p.A, p.B, p.scales, p.ranks, (0, 30, 20, 40))
    with pytest.raises(TypeError):
        kernels.cpu.LoraWeights(p.A.half(), p.B.half(), p.scales, p.ranks, p.slice_offsets)
    with pytest.raises(TypeError, match="ranks"):
        kernels.cpu.LoraWeights(p.A, p.B, p.scales, p.ranks.long(), p.slice_offsets)
    # a slot the weights do not have is refused before anything is written
    small = kernels.cpu.LoraWeights(p.A[:1], p.B[:1], p.scales[:1], p.ranks[:1], p.slice_offsets)
    y = p.y.clone()
    with pytest.raises(IndexError, match="slot"):
        kernels.cpu.apply(y, p.x, small, seg)
    assert torch.equal(y, p.y)
    with pytest.raises(ValueError, match="token_slots"):
        build_lora_meta(torch.zeros(2, 2, dtype=torch.int64))
    # tensors the kernel cannot read: off the CPU, a hand-made meta with int64 indices
    with pytest.raises(TypeError, match="CPU"):
        kernels.cpu.LoraWeights(p.A, p.B.to("meta"), p.scales, p.ranks, p.slice_offsets)
    with pytest.raises(TypeError, match="CPU"):
        kernels.cpu.LoraWeights(p.A, p.B, p.scales.to("meta"), p.ranks, p.slice_offsets)
    bad_meta = dataclasses.replace(p.meta, sorted_token_ids=p.meta.sorted_token_ids.long())
    with pytest.raises(TypeError, match="int32"):
        kernels.cpu.LoraSegments(bad_meta)
    # rows that overlap in memory would be written by two threads at once
    with pytest.raises(ValueError, match="overlap"):
        kernels.cpu.apply(torch.zeros(1, 40).expand(2, 40), p.x, packed, seg)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_zero_slots_leave_y_bit_exact(dtype: torch.dtype) -> None:
    """A slot of rank 0 adds nothing, and y is not even rewritten (bf16 subnormals survive)."""
    p = make_problem([0, 1, 0], QKV, hidden=40, ranks=[0, 4], max_rank=8, dtype=dtype)
    p.y[0] = torch.tensor(1e-39).to(dtype)  # a subnormal in bf16 and fp32
    y = run(p)
    assert torch.equal(y[[0, 2]], p.y[[0, 2]])
    assert not torch.equal(y[1], p.y[1])


def _in_fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter whose kernels are configured, as the node's engine does at start,
    from Settings and so from `env` (OPENLORA_KERNEL_CACHE, OPENLORA_KERNEL_CFLAGS, CC)."""
    setup = "import kernels; from node.config import Settings; kernels.configure(Settings().kernel_config())\n"
    return subprocess.run(
        [sys.executable, "-c", setup + textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_kernel
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flag")
def test_portable_build_matches_oracle(tmp_path) -> None:
    """The C path for CPUs without AVX512-BF16 (built here with AVX-512 switched off)."""
    code = """
        import torch, kernels.cpu
        from tests.kernels.cases import make_problem, oracle_expand, oracle_shrink, assert_close
        assert kernels.cpu.available(), kernels.cpu.unavailable_reason()
        for dtype in (torch.float32, torch.bfloat16):
            p = make_problem([3, -1, 0, 2] + [1] * 20, (24, 8, 8), 40, [16, 8, 4, 16], 16, dtype)
            y = p.y.clone()
            kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta, backend="native")
            assert_close(y, oracle_expand(p, oracle_shrink(p)), dtype)
        print("ok")
    """
    proc = _in_fresh_process(code, OPENLORA_KERNEL_CACHE=str(tmp_path), OPENLORA_KERNEL_CFLAGS="-mno-avx512f")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_without_a_compiler_the_engine_falls_back(tmp_path) -> None:
    """No compiler: available() is False with the reason, the dispatcher picks the reference for
    CPU tensors, the native backend asked for by name is refused with the reason, and the engine
    picks the fused torch layout."""
    code = """
        import torch, kernels, kernels.cpu
        from node.engine.lora import make_layout
        from node.engine.model import LlamaModel
        from tests.conftest import build_tiny_model
        import os, pathlib
        assert not kernels.cpu.available()
        print(kernels.cpu.unavailable_reason())
        print(kernels.backend_for("cpu", torch.float32).name)
        model = LlamaModel.from_pretrained(build_tiny_model(pathlib.Path(os.environ["MODEL_DIR"])))
        try:
            make_layout(model, 2, 8, backend="native")
        except ValueError as e:
            print("refused:", e)
        print(make_layout(model, 2, 8).name)
    """
    proc = _in_fresh_process(
        code, OPENLORA_KERNEL_CACHE=str(tmp_path), PATH=str(tmp_path), CC="", MODEL_DIR=str(tmp_path / "m")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()  # (the tokenizer trainer prints in between)
    reason = "no C compiler found (set CC, or install gcc)"
    assert lines[:2] == [reason, "reference"] and lines[-1] == "fused"
    assert lines[-2] == f"refused: the native LoRA kernel cannot run cpu torch.float32 tensors here: {reason}"


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CC": "/no/such/cc -O2"}, "CC='/no/such/cc -O2' is not an executable"),
        ({"OPENLORA_KERNEL_CFLAGS": "-fvisibility=hidden"}, "undefined symbol: openlora_add_lora_bf16"),
    ],
    ids=["bad-CC", "symbols-hidden"],
)
def test_unusable_builds_fall_back_with_the_reason(tmp_path, env, reason) -> None:
    """A CC that is not there, or a library without the kernel's symbols: available() is False
    with the reason, every later call says the same (no retry, no exception)."""
    if "OPENLORA_KERNEL_CFLAGS" in env and not shutil.which("gcc"):
        pytest.skip("no gcc")
    code = """
        import kernels.cpu
        print(kernels.cpu.available(), kernels.cpu.available(), sorted(kernels.cpu.features()))
        print(kernels.cpu.unavailable_reason())
    """
    proc = _in_fresh_process(code, OPENLORA_KERNEL_CACHE=str(tmp_path), **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.splitlines()[:2]
    assert first == "False False []"
    assert reason in second


def test_cc_with_arguments(tmp_path) -> None:
    """$CC may carry flags (CC="gcc -m64"), as make's convention has it."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    code = """
        import kernels.cpu
        print(kernels.cpu.available(), kernels.cpu.unavailable_reason())
    """
    proc = _in_fresh_process(code, OPENLORA_KERNEL_CACHE=str(tmp_path), CC=f"{gcc} -fno-strict-aliasing")
    assert proc.returncode == 0 and proc.stdout.strip() == "True None", proc.stdout + proc.stderr[-2000:]


def test_a_failing_compiler_is_reported(tmp_path) -> None:
    cc = tmp_path / "badcc"
    cc.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo badcc 1.0 && exit 0\necho 'badcc: error: no' >&2\nexit 3\n"
    )
    cc.chmod(0o755)
    code = """
        import kernels.cpu
        assert not kernels.cpu.available()
        print(kernels.cpu.unavailable_reason())
    """
    proc = _in_fresh_process(code, OPENLORA_KERNEL_CACHE=str(tmp_path / "cache"), CC=str(cc))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed to build the kernel (exit 3): badcc: error: no" in proc.stdout
