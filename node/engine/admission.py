"""What every engine refuses before it queues a request: the same rules, the same messages, whichever
engine (ours or vLLM) serves."""

from __future__ import annotations

from node.engine.errors import PromptTooLongError, UnknownModelError
from node.engine.types import GenerationRequest


def check_fits(request: GenerationRequest, *, model_name: str, serves_adapters: bool, max_model_len: int) -> None:
    """Normalise a request naming the base model to no adapter; refuse an adapter on an engine without
    adapters, an empty prompt, and a prompt plus completion longer than the context."""
    if request.adapter == model_name:
        request.adapter = None
    if request.adapter is not None and not serves_adapters:
        raise UnknownModelError(request.adapter)
    n_prompt = len(request.prompt_token_ids)
    if n_prompt == 0:
        raise PromptTooLongError("the prompt is empty")
    total = n_prompt + request.sampling.max_tokens
    if total > max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_model_len} tokens, but {total} were requested "
            f"({n_prompt} in the prompt, {request.sampling.max_tokens} for the completion)"
        )
