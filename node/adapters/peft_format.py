"""Read and validate a PEFT LoRA adapter directory, straight from its safetensors file.

PEFT's own injection rewrites the module tree (0.4-1.5 s per adapter); reading the two tensors per
projection ourselves takes milliseconds. Nothing is trusted: the config and every tensor are
checked against the base model before the adapter may take a slot.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from node.adapters.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_CONFIG_BYTES = 64 * 1024
# safetensors' names of floating-point dtypes (the header says these without reading values)
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$"
)


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: the node's base model dimensions."""

    name: str
    aliases: tuple[str, ...]  # other names an adapter's base_model_name_or_path may use for it
    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int

    def in_out(self, module: str) -> tuple[int, int]:
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]


@dataclass
class LoraAdapter:
    """A validated adapter in host memory: per (layer, module), A [r, in] and B [out, r] in fp32."""

    name: str
    rank: int
    scale: float
    target_modules: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    cid: str | None = None  # set when its source is content-addressed (IPFS): the name is then its CID


def _fail(name: str, why: str, reason: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter {name!r} rejected: {why}", reason)


def read_config(path: Path, name: str) -> dict:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise _fail(name, f"{CONFIG_FILE} is missing", "missing")
    size = cfg_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise _fail(name, f"{CONFIG_FILE} is {size} bytes (limit {MAX_CONFIG_BYTES})", "config")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(name, f"{CONFIG_FILE} is not valid JSON ({exc})", "config") from None
    if not isinstance(cfg, dict):
        raise _fail(name, f"{CONFIG_FILE} must hold a JSON object", "config")
    return cfg


@dataclass(frozen=True)
class AdapterPlan:
    """What `check_adapter` learned from the config and the safetensors header (no values read)."""

    rank: int
    scale: float
    pairs: dict[tuple[int, str], tuple[str, str]]  # (layer, module) -> (lora_A key, lora_B key)


def check_adapter(
    path: Path,
    name: str,
    base: BaseModelShape,
    max_rank: int,
    *,
    check_base_name: bool = True,
    max_bytes: int = 256 << 20,
) -> AdapterPlan:
    """Every check that needs no tensor values: files, config, base model, rank, targets, and each
    tensor's name, shape and dtype from the safetensors header. Milliseconds for any adapter size."""
    if any((path / f).exists() for f in PICKLE_FILES) and not (path / WEIGHTS_FILE).is_file():
        raise _fail(name, "only safetensors weights are accepted (pickle .bin/.pt files can run code)", "pickle")
    cfg = read_config(path, name)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(name, f"peft_type {cfg.get('peft_type')!r} is not LORA", "unsupported")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise _fail(name, f"{key}={bad} is not supported", "unsupported")
    if cfg.get("bias", "none") != "none":
        raise _fail(name, f"bias={cfg['bias']!r} is not supported (only 'none')", "unsupported")
    for key in (
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layer_replication",
        "lora_bias",
        "trainable_token_indices",
        "target_parameters",
        "use_qalora",
    ):
        if cfg.get(key):
            raise _fail(name, f"{key} is not supported", "unsupported")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _fail(name, f"r must be a positive integer, got {rank!r}", "config")
    if rank > max_rank:
        raise _fail(name, f"rank {rank} exceeds this node's maximum LoRA rank {max_rank}", "rank")
    alpha = cfg.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(name, f"lora_alpha must be a finite number, got {alpha!r}", "config")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    base_name = cfg.get("base_model_name_or_path")
    if check_base_name and base_name and not _same_base(base_name, (base.name, *base.aliases)):
        raise _fail(name, f"it was trained for base model {base_name!r}, this node serves {base.name!r}", "base_model")
    targets = _target_modules(cfg.get("target_modules"), name)

    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise _fail(name, f"{WEIGHTS_FILE} is missing", "missing")
    size = weights_file.stat().st_size
    if size > max_bytes:
        raise _fail(name, f"{WEIGHTS_FILE} is {size} bytes (limit {max_bytes})", "too_large")
    keys: dict[tuple[int, str], dict[str, str]] = {}
    try:
        with safe_open(weights_file, framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise _fail(name, f"unexpected tensor {key!r}", "shape")
                layer, module, ab = int(m[1]), m[2], m[3]
                if module not in targets:
                    raise _fail(name, f"tensor {key!r} is for {module}, which target_modules does not list", "shape")
                if layer >= base.num_layers:
                    raise _fail(name, f"tensor {key!r}: the base model has {base.num_layers} layers", "shape")
                keys.setdefault((layer, module), {})[ab] = key
            if not keys:
                raise _fail(name, "it has no LoRA weights", "shape")
            pairs: dict[tuple[int, str], tuple[str, str]] = {}
            for (layer, module), pair in sorted(keys.items()):
                if set(pair) != {"A", "B"}:
                    raise _fail(name, f"layer {layer} {module} lacks lora_{'A' if 'A' not in pair else 'B'}", "shape")
                a, b = f.get_slice(pair["A"]), f.get_slice(pair["B"])
                fan_in, fan_out = base.in_out(module)
                a_shape, b_shape = tuple(a.get_shape()), tuple(b.get_shape())
                if a_shape != (rank, fan_in) or b_shape != (fan_out, rank):
                    raise _fail(
                        name,
                        f"layer {layer} {module}: lora_A {a_shape} / lora_B {b_shape}, "
                        f"expected {(rank, fan_in)} / {(fan_out, rank)}",
                        "shape",
                    )
                dtypes = a.get_dtype(), b.get_dtype()
                if not all(d in _FLOAT_DTYPES for d in dtypes):
                    raise _fail(
                        name, f"layer {layer} {module}: weights must be floating point, got {dtypes[0]}/{dtypes[1]}",
                        "dtype",
                    )  # fmt: skip
                pairs[(layer, module)] = (pair["A"], pair["B"])
    except SafetensorError as exc:
        raise _fail(name, f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})", "format") from None
    return AdapterPlan(rank=rank, scale=float(scale), pairs=pairs)


def load_adapter(
    path: Path,
    name: str,
    base: BaseModelShape,
    max_rank: int,
    *,
    check_base_name: bool = True,
    max_bytes: int = 256 << 20,
) -> LoraAdapter:
    """Validate `path` as a PEFT LoRA adapter for `base` and load its weights (fp32, host memory)."""
    plan = check_adapter(path, name, base, max_rank, check_base_name=check_base_name, max_bytes=max_bytes)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
            for (layer, module), (a_key, b_key) in plan.pairs.items():
                a, b = f.get_tensor(a_key).float(), f.get_tensor(b_key).float()
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise _fail(name, f"layer {layer} {module}: weights contain NaN or infinity", "non_finite")
                weights[(layer, module)] = (a.contiguous(), b.contiguous())
    except SafetensorError as exc:
        raise _fail(name, f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})", "format") from None
    return LoraAdapter(
        name=name,
        rank=plan.rank,
        scale=plan.scale,
        target_modules=tuple(sorted({m for _, m in weights}, key=SUPPORTED_MODULES.index)),
        weights=weights,
    )


def _target_modules(value, name: str) -> frozenset[str]:
    if isinstance(value, str):
        # PEFT treats a string as a regex over full module names, or an exact suffix
        found = {m for m in SUPPORTED_MODULES if re.fullmatch(value, m) or re.search(value, f"layers.0.x.{m}")}
        if not found:
            raise _fail(
                name, f"target_modules {value!r} matches no supported module {SUPPORTED_MODULES}", "unsupported"
            )
        return frozenset(found)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(name, "target_modules must be a non-empty list of module names", "config")
    unsupported = sorted(set(value) - set(SUPPORTED_MODULES))
    if unsupported:
        raise _fail(
            name,
            f"target modules {unsupported} are not supported (supported: {list(SUPPORTED_MODULES)})",
            "unsupported",
        )
    return frozenset(value)


def _same_base(declared: str, served: tuple[str, ...]) -> bool:
    """Names match ignoring the hub organisation or directory, case and punctuation."""

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.rstrip("/").rsplit("/", 1)[-1].lower())

    return norm(declared) in {norm(s) for s in served}
