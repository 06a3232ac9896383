"""Shared fixtures: a tiny random Llama model with its own byte-level BPE tokenizer, and the
bundled SmolLM2 model (prepared once into a cache shared across test runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton snapshots TRITON_INTERPRET when it is imported, and transformers and peft import it while
# test modules are collected: set it here, before any of them, so that the kernel tests run the
# Triton kernels on CPU tensors in the interpreter. On a CUDA machine it is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Apps built by tests start no local IPFS node unless a test asks for one (Settings(local_ipfs=True)
# or explicit gateways); the IPFS tests run the real node through the `ipfs_node` fixture.
os.environ.setdefault("OPENLORA_LOCAL_IPFS", "false")
# fp32 unless a test asks otherwise: exact comparisons against transformers and PEFT, and batch-
# invariant greedy outputs (bf16 GEMMs may round differently for different batch shapes).
os.environ.setdefault("OPENLORA_DTYPE", "float32")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! This is a tiny tokenizer for tests, trained offline.",
    "def add(a, b):\n    return a + b\n",
    "OpenLoRA serves many LoRA adapters on one base model, in one batch.",
    "Numbers 0123456789 and punctuation .,;:!?()[]{}'\" are common.",
    "Ünïcödé text, emoji 🙂 and CJK 中文 must round-trip through byte-level BPE.",
]


def build_tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_tiny_model(path: Path, *, seed: int = 0, **overrides) -> Path:
    """A random Llama (GQA, 2 layers) saved as an HF safetensors directory with our tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(path)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    eos = vocab["<|im_end|>"]
    cfg = dict(
        vocab_size=len(vocab) + 3,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=vocab["<|im_start|>"],
        eos_token_id=eos,
        pad_token_id=vocab["<|endoftext|>"],
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the init default: sharper, more varied next-token choices
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from node.config import Settings
    from node.engine.prepare import prepare_model

    return prepare_model(Settings(), progress=False)
