"""The kernels' settings come from the node's Settings (the one reader of the environment) and are handed
to the kernels package, which reads no environment of its own (TRITON_INTERPRET is Triton's)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kernels
import kernels.cpu
from node.config import Settings
from node.engine import AsyncEngine

KERNELS_DIR = Path(kernels.__file__).parent


@pytest.fixture(autouse=True)
def restore_kernel_config() -> Iterator[None]:
    before = kernels.config.current()
    yield
    kernels.configure(before)


def test_settings_read_the_kernel_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENLORA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("OPENLORA_KERNEL_CFLAGS", "-O2 '-DX=a b'")
    monkeypatch.setenv("CC", "gcc -m64")
    monkeypatch.setenv("OPENLORA_FORCE_TRITON", "1")
    assert Settings().kernel_config() == kernels.KernelConfig(tmp_path, "-O2 '-DX=a b'", "gcc -m64", True)
    given = Settings(kernel_cflags="-O1", cc="cc", force_triton=False).kernel_config()  # flags beat the environment
    assert (given.cflags, given.cc, given.force_triton) == ("-O1", "cc", False)
    for name in ("OPENLORA_KERNEL_CACHE", "OPENLORA_KERNEL_CFLAGS", "CC", "OPENLORA_FORCE_TRITON"):
        monkeypatch.delenv(name)
    assert Settings().kernel_config() == kernels.KernelConfig()  # unset: the kernels' defaults


def test_the_kernels_package_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = [
        f"{path.name}: {line.strip()}"
        for path in sorted(KERNELS_DIR.glob("*.py"))
        for line in path.read_text().splitlines()
        if re.search(r"\bos\.(environ|getenv)|\bgetenv\(", line) and "TRITON_INTERPRET" not in line
    ]
    assert reads == []
    monkeypatch.setenv("OPENLORA_FORCE_TRITON", "1")  # not configured: no effect on the kernels
    kernels.configure(kernels.KernelConfig())
    assert kernels.backend_for("cpu", torch.float32).name != "triton"


def test_configuring_again_rebuilds_with_the_new_settings(tmp_path: Path) -> None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    kernels.configure(kernels.KernelConfig(cache_dir=tmp_path, cc="/no/such/cc -O2"))
    assert not kernels.cpu.available()
    assert kernels.cpu.unavailable_reason() == "CC='/no/such/cc -O2' is not an executable"
    kernels.configure(kernels.KernelConfig(cache_dir=tmp_path))
    assert kernels.cpu.available(), kernels.cpu.unavailable_reason()
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # built where it was told


def test_engine_start_hands_the_settings_to_the_kernels(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model=str(tiny_model_dir), kernel_cache=tmp_path, kernel_cflags="-O2")
    AsyncEngine.load(settings)
    assert kernels.config.current() == kernels.KernelConfig(tmp_path, "-O2")
