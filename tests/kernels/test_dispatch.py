"""Which implementation runs (kernels.dispatch): native C on CPU where it builds, Triton on CUDA or
when forced, the reference otherwise; asking for one that cannot run says why; no Triton needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

import kernels
import kernels.cpu
from kernels import dispatch, reference
from tests.kernels.cases import assert_close, make_problem, oracle_expand, oracle_shrink

QKV = (24, 8, 8)
RANKS = [16, 8, 4, 16]


def problem(dtype: torch.dtype = torch.float32):
    return make_problem([3, -1, 0, 0, 2, 1], QKV, hidden=40, ranks=RANKS, max_rank=16, dtype=dtype)


@pytest.fixture(autouse=True)
def kernel_config() -> Iterator[None]:
    """Each test starts from the default kernel settings; what a test configures is undone after it."""
    before = kernels.config.current()
    kernels.configure(kernels.KernelConfig())
    yield
    kernels.configure(before)


def force_triton() -> None:
    kernels.configure(kernels.KernelConfig(force_triton=True))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which backend's apply ran, in order (each still runs)."""
    seen: list[str] = []
    for backend in kernels.BACKENDS.values():
        original = backend.apply

        def spy(*args, _name=backend.name, _original=original, **kw):
            seen.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(backend, "apply", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_tensors_use_native_where_it_has_the_dtype(calls: list[str], dtype: torch.dtype) -> None:
    p = problem(dtype)
    y = p.y.clone()
    kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    native = kernels.cpu.available() and dtype in kernels.cpu.DTYPES
    assert calls == ["native" if native else "reference"]
    assert_close(y, oracle_expand(p, oracle_shrink(p)), dtype)


@pytest.mark.parametrize("name", ["native", "reference"])
def test_a_backend_asked_for_by_name_runs(calls: list[str], name: str) -> None:
    if name == "native" and not kernels.cpu.available():
        pytest.skip(f"{kernels.cpu.unavailable_reason()}")
    p = problem()
    y = p.y.clone()
    kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta, backend=name)
    assert calls == [name]
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)


def test_backends_that_cannot_run_say_why() -> None:
    with pytest.raises(ValueError, match="native LoRA kernel cannot run cpu torch.float16 tensors here: it has"):
        kernels.backend_for("cpu", torch.float16, "native")
    with pytest.raises(ValueError, match="native LoRA kernel cannot run meta .* CPU only"):
        kernels.backend_for("meta", torch.float32, "native")
    with pytest.raises(ValueError, match="unknown LoRA kernel backend 'cuda' \\(one of"):
        kernels.backend_for("cpu", torch.float32, "cuda")
    assert kernels.backend_for("cpu", torch.float16).name == "reference"
    assert kernels.backend_for("meta", torch.float32).name == "reference"  # not CUDA, not the CPU


def test_b_storage_each_backend_wants() -> None:
    """The C kernel expands along contiguous columns of B; Triton and the reference take B [S, N, R]."""
    assert {name: b.b_columns for name, b in kernels.BACKENDS.items()} == {
        "native": True,
        "triton": False,
        "reference": False,
    }


def test_forced_triton_matches_the_oracle(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    if not kernels.triton_available():
        pytest.skip("triton does not import here")
    force_triton()
    monkeypatch.setattr(reference, "shrink_expand", None)  # any fallback would fail loudly
    p = problem()
    y = p.y.clone()
    kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert calls == ["triton"]
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)
    t = kernels.lora_shrink(p.x, p.A, p.meta, p.ranks)
    assert_close(t, oracle_shrink(p), torch.float32)
    y = p.y.clone()
    kernels.lora_expand(y, t, p.B, p.meta, p.scales, p.ranks, p.slice_offsets)
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernels.triton_available():
        pytest.skip("triton does not import here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need TRITON_INTERPRET=1"):
        kernels.backend_for("cpu", torch.float32, "triton")


def test_base_only_step_returns_before_any_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    force_triton()
    monkeypatch.setattr(dispatch, "backend_for", None)
    p = make_problem([-1, -1, -1], QKV, hidden=40, ranks=RANKS, max_rank=16)
    y = p.y.clone()
    kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert torch.equal(y, p.y)


def test_import_works_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch, kernels
        meta = kernels.build_lora_meta(torch.tensor([0, -1, 1]))
        args = (torch.ones(3, 5), torch.ones(2, 1, 2, 5), torch.ones(2, 4, 2),
                torch.ones(2), torch.tensor([2, 1], dtype=torch.int32), (0, 4), meta)
        y = torch.zeros(3, 4)
        kernels.add_lora(y, *args, backend="reference")
        assert not kernels.triton_available()
        assert y[0].tolist() == [10.0] * 4 and y[1].tolist() == [0.0] * 4 and y[2].tolist() == [5.0] * 4
        try:
            kernels.add_lora(y, *args, backend="triton")
        except ValueError as e:
            print("refused:", e)
        kernels.configure(kernels.KernelConfig(force_triton=True))
        try:
            kernels.add_lora(y, *args)
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(
        "refused: the triton LoRA kernel cannot run cpu torch.float32 tensors here: Triton failed"
    )
    assert lines[1].startswith("refused: OPENLORA_FORCE_TRITON=1 but Triton failed to import")
