"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET is read when a @triton.jit function is defined, so it must be set before
`kernels.shrink` / `kernels.expand` are imported. `kernels` imports them lazily (on the first
Triton dispatch), so setting it here, before any kernel test module runs, is enough; CI
(.ci/run -> make test) needs nothing else. On a CUDA machine the variable is left alone.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
