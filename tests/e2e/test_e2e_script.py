"""scripts/e2e_devnet.py end to end (the tiny model, the issue's 50 requests, half streamed, over the four demo
adapters and the base model): its RESULT line says nothing was lost or
doubled, everything settled and the auditor found nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_e2e_devnet_script(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "e2e_devnet.py"), "--requests", "50", "--model", str(tiny_model_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=880, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last == "RESULT requests=50 settled=50 lost=0 doubled=0 audit=clean", last
