"""The benchmark and GPU-check scripts run end to end on CPU (toy sizes, Triton interpreter), so a
future session with a GPU does not spend its device time on a crash."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("OPENLORA_FORCE_TRITON", None)
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_cpu_benchmark_quick() -> None:
    out = run([sys.executable, "scripts/bench_kernels.py", "--quick", "--threads", "1"])
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT cpu_lora_overhead_decode=\d+\.\d+ cpu_lora_overhead_prefill=\d+\.\d+", last), last


def test_gpu_check_script_on_cpu(tmp_path: Path) -> None:
    """The whole gpu_check.sh: the correctness check and the Triton benchmark in the interpreter."""
    out = run(["bash", "scripts/gpu_check.sh"], OUT=str(tmp_path), GPU_CHECK_ALLOW_CPU="1", PYTHON=sys.executable)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "correctness: ok; 6 ok, 0 failed" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "RESULT check=pass"
    assert "ERROR" not in (tmp_path / "bench_triton.txt").read_text()
    assert {"env.txt", "check.log", "check.txt", "bench.log", "bench_triton.txt"} <= {
        p.name for p in tmp_path.iterdir()
    }


def test_gpu_check_refuses_without_cuda(tmp_path: Path) -> None:
    out = run(["bash", "scripts/gpu_check.sh"], OUT=str(tmp_path), PYTHON=sys.executable)
    assert out.returncode == 2 and "no CUDA device" in out.stderr
