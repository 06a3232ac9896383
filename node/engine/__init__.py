"""The inference engine: Llama-family model, paged KV cache, continuous batching, sampling."""

from node.engine.async_engine import AsyncEngine
from node.engine.errors import (
    EngineError,
    EngineStoppedError,
    ModelNotFoundError,
    PromptTooLongError,
    UnknownModelError,
)
from node.engine.types import Engine, FinishReason, GenerationOutput, GenerationRequest, SamplingParams

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineError",
    "EngineStoppedError",
    "FinishReason",
    "GenerationOutput",
    "GenerationRequest",
    "ModelNotFoundError",
    "PromptTooLongError",
    "SamplingParams",
    "UnknownModelError",
]
