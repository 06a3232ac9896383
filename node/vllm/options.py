"""The options of the vLLM server the node starts, from the node's own settings.

The same settings mean the same limits on either engine: batch size, prefill budget per step, KV-cache
capacity (num_kv_blocks x kv_block_size tokens, in bytes for vLLM), context length, prefix caching,
adapter slots and the largest rank. Operators add any other vLLM option with `--engine-arg`; those come
last, so they win (tensor parallelism, quantization, CUDA graphs ...).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from node.config import Settings

# vLLM accepts only these values for --max-lora-rank (vllm/config/lora.py MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def lora_rank_bound(max_rank: int) -> int:
    """The smallest rank vLLM accepts that holds every adapter the node accepts."""
    return next(r for r in VLLM_LORA_RANKS if r >= max_rank)


def kv_cache_bytes(model_dir: Path, dtype: str, tokens: int) -> int:
    """Bytes of KV cache for `tokens` tokens of the model in `model_dir` (K and V, every layer)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return tokens * cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * _DTYPE_BYTES[dtype]


def extra_args(settings: Settings) -> list[str]:
    """--engine-arg values, each split like a shell word list ("--tensor-parallel-size 8" -> two words)."""
    return [word for arg in settings.engine_args for word in shlex.split(arg)]


def server_args(
    settings: Settings, model_dir: Path, served_name: str, dtype: str, *, lora: bool, stand_in: bool = False
) -> list[str]:
    """The server's options but the host and port. `stand_in`: one more adapter slot, for the base
    model's stand-in adapter (node.vllm.engine: vLLM's CPU build)."""
    tokens = settings.num_kv_blocks * settings.kv_block_size
    args = [
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--dtype", dtype,
        "--max-num-seqs", str(settings.max_num_seqs),
        "--max-num-batched-tokens", str(settings.max_prefill_tokens),
        "--kv-cache-memory-bytes", str(kv_cache_bytes(model_dir, dtype, tokens)),
        "--enable-prefix-caching" if settings.prefix_caching else "--no-enable-prefix-caching",
        # sampling is what each request says, as in our engine (not the model's generation_config.json)
        "--generation-config", "vllm",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if settings.max_model_len is not None:
        args += ["--max-model-len", str(settings.max_model_len)]
    if lora:
        args += [
            "--enable-lora",
            "--max-loras", str(settings.max_loras + stand_in),
            "--max-cpu-loras", str(max(settings.max_loras, settings.host_adapters) + stand_in),
            "--max-lora-rank", str(lora_rank_bound(settings.max_lora_rank)),
        ]  # fmt: skip
    return args + extra_args(settings)
