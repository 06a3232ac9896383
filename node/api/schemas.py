"""OpenAI wire schemas (pydantic v2): the request bodies we accept and the bodies we send.

Requests are strict about the types of the fields we know (a string where a number belongs is a
400) and ignore fields we do not know: OpenAI clients send extras (`user`, `logit_bias`, ...).
Optional fields accept `null`, as OpenAI's API does. The OpenAPI document is generated from these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # NaN and infinity are no numbers a client means: refused as such, not as "should be <= 2".
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = Field(
        None, description="Send one last chunk with `usage` and empty `choices` before `data: [DONE]`."
    )


class GenerationBody(_Request):
    """The fields chat and text completions share."""

    model: str = Field(description="A name from GET /v1/models.")
    n: Literal[1] | None = Field(None, description="Number of choices; only 1 is supported.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; default: the node's default, capped by the context."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k likeliest tokens; 0 = off.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, prompt and parameters give the same output.")
    stop: str | list[str] | None = Field(None, description="Stop before any of these strings (not included).")
    stream: bool | None = Field(None, description="Stream increments as server-sent events.")
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="Extension: keep generating past end-of-sequence.")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


_REFUSED = "Not supported yet: refused with 400 `unsupported_parameter` / `unsupported_value` rather than ignored."


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred over `max_tokens` when both are set.")
    # OpenAI fields the node does not implement. A client that asks for them must not get prose
    # that looks like an answer, so anything but their neutral value is refused.
    logprobs: bool | None = Field(None, description=f"Only false. {_REFUSED}")
    top_logprobs: int | None = Field(None, ge=0, le=20, description=f"Only 0. {_REFUSED}")
    response_format: ResponseFormat | None = Field(None, description=f'Only {{"type": "text"}}. {_REFUSED}')
    tools: list[dict] | None = Field(None, description=f'Only with `tool_choice: "none"`. {_REFUSED}')
    tool_choice: str | dict | None = Field(None, description=f'Only "none" or "auto" without tools. {_REFUSED}')
    functions: list[dict] | None = Field(None, description=f"Deprecated form of `tools`. {_REFUSED}")
    function_call: str | dict | None = Field(None, description=f"Deprecated form of `tool_choice`. {_REFUSED}")


class CompletionRequest(GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="Text or token ids. A list of prompts must hold exactly one."
    )
    logprobs: int | None = Field(None, ge=0, le=5, description=f"Only null. {_REFUSED}")


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for model in models for name in model.model_fields)


REQUEST_FIELD_NAMES = _field_names(
    ChatCompletionRequest, CompletionRequest, ChatMessage, TextContentPart, StreamOptions, ResponseFormat
)

FinishReasonName = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReasonName
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReasonName | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReasonName | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A completion, or (with `usage` null until the usage chunk) one `data:` event of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openlora"
    # On a chain-backed node: the registry id (0: the base model) and prices (OPEN wei per token, decimal
    # strings) a signed request for this model is priced with. Absent elsewhere.
    adapterId: str | None = None  # noqa: N815 (the wire name)
    priceIn: str | None = None  # noqa: N815
    priceOut: str | None = None  # noqa: N815


class AttributionInfo(BaseModel):
    """GET /v1/attribution: what a dApp signs for this node (EIP-712 domain, node, record signer, limits)."""

    chainId: int  # noqa: N815 (wire names)
    settlement: str
    node: str
    signer: str
    nodeFeePerToken: str  # noqa: N815
    maxRequestTtl: int  # noqa: N815
    maxCommitDelay: int  # noqa: N815
    allowUnsigned: bool  # noqa: N815


class PayerPosition(BaseModel):
    """GET /v1/attribution/payers/{payer}: sign above `cumulativeCap`; `available` escrow for new requests."""

    payer: str
    cumulativeCap: str  # noqa: N815
    available: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    # engine_stopped comes with HTTP 503; degraded (200): the base model serves, uncached adapters don't
    status: Literal["ok", "degraded", "engine_stopped"] = "ok"
    model: str
    running: int
    waiting: int
    ipfs: Literal["ok", "down"] | None = Field(
        None, description="The local IPFS node this node started and supervises (null when it runs none)."
    )


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
