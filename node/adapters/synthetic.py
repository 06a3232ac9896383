"""Random PEFT LoRA adapters for a base model: demo adapters, tests and benchmarks.

They are written by PEFT itself (`get_peft_model` + `save_pretrained`), so they are exactly what
a contributor's training run would publish, with B initialised non-zero so each adapter visibly
changes the base model's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_random_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    std: float = 0.05,
    base_model=None,
) -> Path:
    """Write a PEFT adapter directory for the model at `base_dir` (pass `base_model` to reuse one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = base_model or AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        init_lora_weights=False,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    config_file = out_dir / "adapter_config.json"
    # record the base model as given (PEFT writes the model's own _name_or_path)
    cfg = json.loads(config_file.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    config_file.write_text(json.dumps(cfg, indent=2))
    if base_model is not None:
        peft_model.unload()  # give the caller its base model back unchanged
    return out_dir
