"""Llama-family transformer (Llama 2/3, SmolLM2, Mistral) over a paged KV cache.

One forward pass takes a flat batch of tokens from many sequences: the prefill chunks of newly
admitted requests and one decode token of each running one. The linear layers see all tokens at
once (one GEMM per projection group); attention is done per prefill chunk and batched for decode.
q/k/v and gate/up are fused into one weight each at load time, so each takes one GEMM.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from node.engine.batch import StepBatch


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    # derived
    q_size: int = 0
    kv_size: int = 0

    def __post_init__(self) -> None:
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        # transformers 5 nests theta and scaling under rope_parameters; older files use the flat keys.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            rope_scaling=rope,
            eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with linear or Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    kind = cfg.rope_scaling.get("rope_type") or cfg.rope_scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / cfg.rope_scaling["factor"]
    if kind == "llama3":
        s = cfg.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are scaled down by `factor`, short ones kept, the band between blended.
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, blended, out)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused kernel
    var = x.float().pow(2).mean(-1, keepdim=True)  # half precision: normalise in fp32, as HF does
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim] (rotate-half convention, as HF Llama)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, q_size]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


class LoraHook:
    """Computes a projection group with its LoRA updates; the LoRA slot pool implements it.

    `group` is one of "qkv", "o", "gate_up", "down" (the fused weights of `LayerWeights`).
    """

    def project(
        self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: StepBatch
    ) -> torch.Tensor:
        raise NotImplementedError


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.final_norm = w["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else w["lm_head.weight"]
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            bias = [w.get(a + f"{n}_proj.bias") for n in "qkv"]
            self.layers.append(
                LayerWeights(
                    input_norm=w[p + "input_layernorm.weight"],
                    qkv=torch.cat([w[a + f"{n}_proj.weight"] for n in "qkv"]).contiguous(),
                    qkv_bias=torch.cat(bias) if all(b is not None for b in bias) else None,
                    o=w[a + "o_proj.weight"],
                    o_bias=w.get(a + "o_proj.bias"),
                    post_norm=w[p + "post_attention_layernorm.weight"],
                    gate_up=torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]).contiguous(),
                    gate_up_bias=(
                        torch.cat([w[m + "gate_proj.bias"], w[m + "up_proj.bias"]]) if cfg.mlp_bias else None
                    ),
                    down=w[m + "down_proj.weight"],
                    down_bias=w.get(m + "down_proj.bias"),
                )
            )
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.lora: LoraHook | None = None

    @classmethod
    def from_pretrained(cls, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlamaModel:
        cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    weights[key] = f.get_tensor(key)
        return cls(cfg, weights, dtype, device)

    def reserve_rows(self, group: str, rows: int) -> list[torch.Tensor]:
        """Each layer's `group` weight [N, H_in] moved into a buffer [N + rows, H_in] with `rows`
        zero rows below it, which is returned (one per layer); the model reads its first N rows
        in place from then on, so one GEMM against the buffer's first N + k rows gives the base
        projection and k more outputs (the fused LoRA layout keeps its A rows there)."""
        buffers = []
        for lw in self.layers:
            w = getattr(lw, group)  # [N, H_in]
            buffer = torch.zeros(w.shape[0] + rows, w.shape[1], dtype=w.dtype, device=w.device)
            buffer[: w.shape[0]] = w
            setattr(lw, group, buffer[: w.shape[0]])
            buffers.append(buffer)
        return buffers

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]  # [T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [num_logit_rows, vocab] for the rows in `batch.logit_rows` (one per sequence)."""
        cfg = self.cfg
        h = self.embed[batch.token_ids]  # [T, hidden]
        cos, sin = self.rope(batch.positions)
        k_end = cfg.q_size + cfg.kv_size
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
            qkv = self.project(i, "qkv", x, lw.qkv, lw.qkv_bias, batch)  # [T, q + 2kv]
            # q and k heads side by side: one RoPE pass for both
            qk = apply_rope(qkv[:, :k_end].view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim), cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, k_end:].view(-1, cfg.num_kv_heads, cfg.head_dim)
            attn = self.attention(q, k, v, k_cache[i], v_cache[i], batch)  # [T, q_size]
            o = self.project(i, "o", attn, lw.o, lw.o_bias, batch)
            h = h + o
            x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            gu = self.project(i, "gate_up", x, lw.gate_up, lw.gate_up_bias, batch)  # [T, 2 * intermediate]
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
            down = self.project(i, "down", act, lw.down, lw.down_bias, batch)
            h = h + down
        # Only each sequence's last row needs logits: saves a [T, vocab] GEMM on long prefills.
        last = rms_norm(h[batch.logit_rows], self.final_norm, cfg.rms_norm_eps)
        return F.linear(last, self.lm_head).float()

    def project(
        self, layer: int, group: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, batch: StepBatch
    ) -> torch.Tensor:
        if self.lora is None:
            return F.linear(x, w, b)
        return self.lora.project(layer, group, x, w, b, batch)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]; caches: [num_slots, KVH, D] (slot = block * block_size + offset)
        cfg = self.cfg
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty(q.shape[0], cfg.q_size, dtype=q.dtype, device=q.device)
        for chunk in batch.prefills:
            rows = slice(chunk.start, chunk.end)
            qs = q[rows].transpose(0, 1)[None]  # [1, H, n, D]
            if chunk.context_start == 0:
                # Whole prompt (or its first chunk): attend to the new tokens only, causally.
                ks, vs = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                ks = k_cache[chunk.context_slots].transpose(0, 1)[None]  # [1, KVH, L, D]
                vs = v_cache[chunk.context_slots].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=chunk.mask, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1).reshape(-1, cfg.q_size)
        if batch.num_decode:
            d = batch.decode_rows
            n, kvh, hd, bs = batch.num_decode, cfg.num_kv_heads, cfg.head_dim, batch.block_size
            # GQA without repeating K/V: the query heads sharing a KV head become that head's
            # "query positions" (HF order: query head h uses KV head h // group)
            qd = q[d].view(n, kvh, cfg.num_heads // kvh, hd)  # [B, KVH, group, D]
            blocks = batch.decode_block_tables.view(-1)
            kd = k_cache.view(-1, bs, kvh, hd).index_select(0, blocks).view(n, -1, kvh, hd).transpose(1, 2)
            vd = v_cache.view(-1, bs, kvh, hd).index_select(0, blocks).view(n, -1, kvh, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask)  # [B, KVH, group, D]
            out[d] = o.reshape(n, cfg.q_size)
        return out
