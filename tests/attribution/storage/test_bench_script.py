"""scripts/bench_attribution.py runs end to end at toy sizes and ends with its RESULT line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_bench_attribution_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench_attribution.py", "--records", "80", "--repeats", "1", "--dir", str(tmp_path),
         "--only", "journal"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "naive: one transaction per record" in out.stdout
    assert re.fullmatch(r"RESULT journal_records_per_s=\d+", out.stdout.strip().splitlines()[-1])
    assert list(tmp_path.iterdir()) == []  # the scratch journals are removed
