"""Which implementation runs: the reference on CPU, Triton on CUDA or when forced; no Triton needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.cases import assert_close, make_problem, oracle_expand, oracle_shrink

QKV = (24, 8, 8)
RANKS = [16, 8, 4, 16]


def problem():
    return make_problem([3, -1, 0, 0, 2, 1], QKV, hidden=40, ranks=RANKS, max_rank=16)


def test_cpu_tensors_use_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENLORA_FORCE_TRITON", raising=False)
    calls = []
    monkeypatch.setattr(reference, "add_lora", lambda *args: calls.append(args))
    p = problem()
    kernels.add_lora(p.y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert len(calls) == 1


def test_forced_triton_matches_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernels.triton_available():
        pytest.skip("triton does not import here")
    monkeypatch.setenv("OPENLORA_FORCE_TRITON", "1")
    monkeypatch.setattr(reference, "add_lora", None)  # any fallback would fail loudly
    p = problem()
    y = p.y.clone()
    kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)
    t = kernels.lora_shrink(p.x, p.A, p.meta, p.ranks)
    assert_close(t, oracle_shrink(p), torch.float32)
    y = p.y.clone()
    kernels.lora_expand(y, t, p.B, p.meta, p.scales, p.ranks, p.slice_offsets)
    assert_close(y, oracle_expand(p, oracle_shrink(p)), torch.float32)


def test_base_only_step_returns_before_any_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENLORA_FORCE_TRITON", "1")
    monkeypatch.setattr(kernels, "_kernels_for", None)
    monkeypatch.setattr(reference, "add_lora", None)
    p = make_problem([-1, -1, -1], QKV, hidden=40, ranks=RANKS, max_rank=16)
    y = p.y.clone()
    kernels.add_lora(y, p.x, p.A, p.B, p.scales, p.ranks, p.slice_offsets, p.meta)
    assert torch.equal(y, p.y)


def test_import_works_without_triton() -> None:
    code = textwrap.dedent(
        """
        import os, sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch, kernels
        meta = kernels.build_lora_meta(torch.tensor([0, -1, 1]))
        y = torch.zeros(3, 4)
        kernels.add_lora(y, torch.ones(3, 5), torch.ones(2, 1, 2, 5), torch.ones(2, 4, 2),
                         torch.ones(2), torch.tensor([2, 1], dtype=torch.int32), (0, 4), meta)
        assert not kernels.triton_available()
        assert y[0].tolist() == [10.0] * 4 and y[1].tolist() == [0.0] * 4 and y[2].tolist() == [5.0] * 4
        os.environ["OPENLORA_FORCE_TRITON"] = "1"
        try:
            kernels.add_lora(y, torch.ones(3, 5), torch.ones(2, 1, 2, 5), torch.ones(2, 4, 2),
                             torch.ones(2), torch.tensor([2, 1], dtype=torch.int32), (0, 4), meta)
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: OPENLORA_FORCE_TRITON=1 but Triton failed to import" in out.stdout
