"""The Triton kernels compile for sm_90 (H100/H200) on this CPU-only machine (see aot_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_kernels(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, str(Path(__file__).with_name("aot_compile.py")), *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def needs_triton() -> None:
    pytest.importorskip("triton")


def test_kernels_compile_for_sm90() -> None:
    out = compile_kernels()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 6" in out.stdout


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90() -> None:
    out = compile_kernels("--full")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 54" in out.stdout
