"""What a new user does: `openlora devnet up`, paste the printed paid request, audit, `openlora devnet down`.
Real processes (the tiny model for speed), real anvil and IPFS node."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPENLORA = str(Path(sys.executable).parent / "openlora")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_devnet_up_paid_request_audit_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--cache-dir", str(tmp_path / "cache")]
    up = subprocess.Popen(
        [OPENLORA, "devnet", "up", "--port", "0", "--model", str(tiny_model_dir), *common],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 600
        while not any("Stop with Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines)
            lines.append(up.stdout.readline())
        text = "".join(lines)
        client = next(line.strip() for line in lines if "openlora client chat" in line)
        argv = shlex.split(client.replace(".venv/bin/openlora", OPENLORA)) + ["--tokenizer", str(tiny_model_dir),
                                                                               "--state-file", str(tmp_path / "caps")]  # fmt: skip
        paid = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert paid.returncode == 0, paid.stderr
        assert "verified usage record" in paid.stdout + paid.stderr  # the answer on stdout, the record on stderr
        audit_line = next(line for line in lines if "openlora audit" in line)
        audit = shlex.split(
            audit_line[audit_line.index(".venv/bin/openlora") :].replace(".venv/bin/openlora", OPENLORA)
        )
        deadline = time.monotonic() + 180  # the devnet node commits every 30 s
        while True:
            report = subprocess.run(audit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert report.returncode == 0, report.stdout + report.stderr
            if re.search(r"audit: [1-9]\d* batches, 1 records, clean", report.stdout):
                break
            assert time.monotonic() < deadline, text + report.stdout
            time.sleep(5)
        down = subprocess.run([OPENLORA, "devnet", "down", *common], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert down.returncode == 0 and "devnet stopped" in down.stdout, down.stderr
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
