"""The vLLM backend's parts that need no vLLM: its server options from the node's settings, the
loopback rule for --engine-url, the pinned environment check, and the adapter copies it hands vLLM
(read back by the node's own validator as the reference)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from node.adapters.peft_format import SUPPORTED_MODULES, load_adapter
from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine.model import ModelConfig
from node.engine.prepare import base_model_shape
from node.vllm.adapters import weights_digest, write_peft, zero_adapter
from node.vllm.environment import missing, pinned
from node.vllm.options import kv_cache_bytes, lora_rank_bound, server_args


def test_server_args_carry_the_node_limits(tiny_model_dir: Path) -> None:
    settings = Settings(max_num_seqs=5, max_prefill_tokens=300, num_kv_blocks=10, kv_block_size=16, max_loras=3,
                        host_adapters=2, max_lora_rank=12, prefix_caching=False, max_model_len=256)  # fmt: skip
    args = server_args(settings, tiny_model_dir, "tiny", "float32", lora=True)
    opts = dict(zip(args, args[1:]))
    assert opts["--model"] == str(tiny_model_dir)
    assert opts["--served-model-name"] == "tiny" and opts["--dtype"] == "float32"
    assert opts["--max-num-seqs"] == "5" and opts["--max-num-batched-tokens"] == "300"
    # 160 tokens x 2 layers x K and V x 2 KV heads x head_dim 16 x 4 bytes
    assert opts["--kv-cache-memory-bytes"] == str(160 * 2 * 2 * 2 * 16 * 4)
    assert "--no-enable-prefix-caching" in args and "--enable-prefix-caching" not in args
    assert opts["--max-model-len"] == "256"
    assert opts["--max-loras"] == "3" and opts["--max-cpu-loras"] == "3"  # never below max_loras
    assert opts["--max-lora-rank"] == "16"
    assert opts["--generation-config"] == "vllm"  # sampling only as each request says, as in our engine
    assert "--host" not in args and "--port" not in args  # the server owns those (loopback)
    assert "--enable-lora" not in server_args(settings, tiny_model_dir, "tiny", "float32", lora=False)
    # vLLM's CPU build: one more slot for the base model's stand-in adapter, not one of the operator's
    args = server_args(settings, tiny_model_dir, "tiny", "float32", lora=True, stand_in=True)
    opts = dict(zip(args, args[1:]))
    assert opts["--max-loras"] == "4" and opts["--max-cpu-loras"] == "4"


def test_engine_args_come_last_split_like_shell_words(tiny_model_dir: Path) -> None:
    settings = Settings(engine_args=["--tensor-parallel-size 8", "--enforce-eager", "--max-num-seqs=64"])
    args = server_args(settings, tiny_model_dir, "tiny", "bfloat16", lora=False)
    assert args[-4:] == ["--tensor-parallel-size", "8", "--enforce-eager", "--max-num-seqs=64"]  # later ones win


def test_kv_cache_bytes_by_dtype(tiny_model_dir: Path) -> None:
    assert kv_cache_bytes(tiny_model_dir, "bfloat16", 1) * 2 == kv_cache_bytes(tiny_model_dir, "float32", 1) == 512


@pytest.mark.parametrize(("rank", "bound"), [(1, 1), (2, 8), (7, 8), (8, 8), (9, 16), (16, 16), (17, 32), (256, 256)])
def test_lora_rank_bound_is_the_smallest_rank_vllm_accepts(rank: int, bound: int) -> None:
    assert lora_rank_bound(rank) == bound


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8001", "http://localhost:8001", "http://[::1]:8001", "http://127.0.0.2:9"]
)
def test_engine_url_on_loopback_is_accepted(url: str) -> None:
    assert Settings(engine_url=url).engine_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.0.0.5:8000", "not on the loopback interface"),
        ("http://0.0.0.0:8000", "not on the loopback interface"),
        ("http://vllm:8000", "not on the loopback interface"),
        ("ftp://127.0.0.1:8000", r"not an http\(s\) URL"),
        ("127.0.0.1:8000", r"not an http\(s\) URL"),
    ],
)
def test_engine_url_elsewhere_is_refused(url: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Settings(engine_url=url)


def test_pinned_environment_check(tmp_path: Path) -> None:
    reqs = tmp_path / "requirements.txt"
    have = version("pytest")
    reqs.write_text(f"# comment\nPyTest=={have}  # case and comments do not matter\nno_such.package==1.0\n")
    assert pinned(reqs) == {"pytest": have, "no-such-package": "1.0"}
    assert missing(Path(sys.executable), reqs) == ["no-such-package==1.0"]
    reqs.write_text(f"pytest=={have}.post999\n")  # another version is missing too
    assert missing(Path(sys.executable), reqs) == [f"pytest=={have}.post999"]
    assert missing(tmp_path / "no-python", reqs) == [f"pytest=={have}.post999"]


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "targets"),
    [
        (4, 8, False, ("q_proj", "v_proj")),
        (8, 5.5, True, ("gate_proj", "up_proj", "down_proj")),
        (16, 16, False, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ],
)
def test_vllm_copy_is_the_validated_adapter(tiny_model_dir: Path, tmp_path: Path, rank, alpha, rslora, targets) -> None:
    """What vLLM is given, read back by the node's validator, is exactly what the node validated."""
    cfg = ModelConfig.from_hf(json.loads((tiny_model_dir / "config.json").read_text()))
    base = base_model_shape(cfg, "tiny", tiny_model_dir)
    original = make_random_adapter(tiny_model_dir, tmp_path / "src", rank=rank, alpha=alpha, use_rslora=rslora,
                                   target_modules=targets, seed=rank)  # fmt: skip
    validated = load_adapter(original, "a", base, 16, check_base_name=False)
    write_peft(validated, tmp_path / "copy")
    again = load_adapter(tmp_path / "copy", "a", base, 16, check_base_name=False)
    assert (again.rank, again.target_modules) == (validated.rank, validated.target_modules)
    assert again.scale == pytest.approx(validated.scale, rel=1e-12)
    assert again.weights.keys() == validated.weights.keys()
    for key, (a, b) in validated.weights.items():
        assert torch.equal(again.weights[key][0], a) and torch.equal(again.weights[key][1], b)
    assert weights_digest(again) == weights_digest(validated)
    validated.weights[next(iter(validated.weights))][1][0, 0] += 1e-3
    assert weights_digest(again) != weights_digest(validated)


def test_base_stand_in_is_a_valid_adapter_of_zeros(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.from_hf(json.loads((tiny_model_dir / "config.json").read_text()))
    base = base_model_shape(cfg, "tiny", tiny_model_dir)
    write_peft(zero_adapter(base, "tiny.base-stand-in"), tmp_path / "stand-in")
    again = load_adapter(tmp_path / "stand-in", "stand-in", base, 1, check_base_name=False)
    assert again.rank == 1 and set(again.target_modules) == set(SUPPORTED_MODULES)
    assert len(again.weights) == cfg.num_layers * len(SUPPORTED_MODULES)
    assert all(not a.any() and not b.any() for a, b in again.weights.values())
