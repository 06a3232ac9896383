"""The kernels' settings, handed in by whoever runs them: the package reads no environment.

The node sets them once at engine start from its Settings (`node.config.Settings.kernel_config`,
where `OPENLORA_KERNEL_CACHE`, `OPENLORA_KERNEL_CFLAGS`, `CC` and `OPENLORA_FORCE_TRITON` are read);
benchmarks and tests do the same, or configure the kernels directly. Until then the defaults hold.
(`TRITON_INTERPRET` is Triton's own variable, read by Triton.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "openlora" / "kernels"


@dataclass(frozen=True)
class KernelConfig:
    cache_dir: Path | None = None  # where the native CPU kernel is built; None: ~/.cache/openlora/kernels
    cflags: str = ""  # extra compiler flags for it, shell-quoted, after the built-in ones
    cc: str = ""  # its C compiler with any arguments, shell-quoted (make's CC); "": gcc, else cc
    force_triton: bool = False  # Triton for every LoRA update (on CPU tensors only under TRITON_INTERPRET=1)


_current = KernelConfig()


def configure(config: KernelConfig) -> None:
    """Use `config` from now on. The native kernel is built (or loaded) again on its next use if the
    build settings changed."""
    global _current
    _current = config


def current() -> KernelConfig:
    return _current
