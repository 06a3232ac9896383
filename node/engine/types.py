"""The engine's public interface: what a request asks for and what comes back.

Everything above `node/engine` (the API, the CLI, benchmarks) talks to the engine through these
types and `AsyncEngine.generate`; nothing above it touches torch.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from node.adapters.peft_format import BaseModelShape, LoraAdapter


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    ABORT = "abort"  # cancelled (client went away)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature == 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # same seed, same prompt, same params -> same output
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None = base model only


@dataclass
class GenerationOutput:
    """One streamed increment of a request; the last one has `finish_reason` set."""

    request_id: str
    token_ids: list[int]  # new tokens in this increment
    text: str  # new detokenized text in this increment (stop strings already cut)
    prompt_tokens: int
    completion_tokens: int  # total so far
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class AdapterProvider(Protocol):
    """What an engine needs of the node's adapters: verified, validated adapters by name.

    The node owns adapters (sources, fetching, verification, validation: `node.adapters`) and hands
    a provider to the engine (`AsyncEngine.load(..., adapters=...)`); the engine never builds one.
    `node.adapters.manager.AdapterManager` is the node's."""

    base: BaseModelShape  # the base model every adapter it gives was validated against

    async def acquire(self, name: str) -> LoraAdapter:
        """The adapter in host memory, loaded first if needed; pair with `release`. Raises
        LookupError for a name no source knows (an AdapterError says why when a source knows more)."""
        ...

    def release(self, adapter: LoraAdapter) -> None:
        """The engine is done with one `acquire`'s adapter."""
        ...


class Engine(Protocol):
    """What the API serves through: our engine (`node.engine.AsyncEngine`) or vLLM's server
    (`node.vllm.engine.VllmEngine`), chosen by `--engine`.

    The API tokenizes (chat template included) with `tokenizer` and submits token ids; a request
    names its adapter by the node's name for it, and the engine gets it verified and validated from
    the `AdapterProvider` it was handed. `generate` streams the text and the token counts the usage
    record is priced on; leaving the stream early (aclose, cancel) aborts the request."""

    model_name: str  # the base model's name in /v1/models
    max_model_len: int  # prompt + completion tokens, at most
    tokenizer: Any  # a transformers tokenizer of the base model

    @property
    def healthy(self) -> bool:
        """It can serve now (False: /health says engine_stopped and requests get 503)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def close(self) -> None:
        """Stops for good and releases what it holds (the app calls it at cleanup)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The request's outputs as they come; the last one has a finish reason."""
        ...

    def stats(self) -> dict[str, int]:
        """running, waiting, kv_blocks_used, kv_blocks_total, kv_blocks_cached, prefix_cache_hit_tokens,
        prefix_cache_miss_tokens."""
        ...

    def held_adapters(self) -> list[str]:
        """The adapters in the engine's compute slots now, by the node's names."""
        ...

    def lora_stats(self) -> dict[str, int]:
        """device (adapters held now) and device_loads (since start), for /metrics."""
        ...
