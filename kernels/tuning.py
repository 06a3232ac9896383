"""Launch configs of the Triton kernels: data in configs.json, plus the split-K rule."""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path

import torch

_CONFIGS = Path(__file__).with_name("configs.json")


@lru_cache(maxsize=1)
def _configs() -> dict:
    return json.loads(_CONFIGS.read_text())


def kernel_config(op: str, decode: bool) -> dict:
    """The launch config of `op` ("shrink" or "expand") for a decode-like or a prefill-like step."""
    return dict(_configs()[op]["decode" if decode else "prefill"])


def split_k(programs: int, k_blocks: int, device: torch.device) -> int:
    """How many programs share one output tile's H_in: enough to fill the SMs, at most k_blocks.

    A decode shrink has few output tiles (one per adapter and slice) but long rows (H_in = 4096),
    so without a split most SMs would idle while a few stream their A slices.
    """
    cfg = _configs()
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 1
    want = -(-cfg["split_k_waves"] * sms // max(programs, 1))
    return max(1, min(want, k_blocks, cfg["max_split_k"]))


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
