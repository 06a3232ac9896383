"""POST /v1/chat/completions and /v1/completions: parse, tokenize, run through the engine, answer.

Both endpoints share one path; `_ChatFormat` and `_CompletionFormat` differ only in the bodies and
chunks they build. Tokenizing runs in an executor (a long prompt takes milliseconds of CPU); the
engine runs in its own thread. Leaving `engine.generate` early (the client went away and aiohttp
cancelled the handler, or a stream write failed) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, NoReturn, TypeVar

import jinja2
from aiohttp import web
from pydantic import BaseModel, ValidationError

from attribution.wire import RECEIPT_EVENT_OBJECT, RECEIPT_FIELD
from node.api import accounting
from node.api.adapters import resolve_limited
from node.api.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    from_validation_error,
)
from node.api.keys import ENGINE, METRICS, SETTINGS, STREAM_RESPONSE
from node.api.metrics import endpoint_label
from node.api.schemas import (
    REQUEST_FIELD_NAMES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    GenerationBody,
    Usage,
)
from node.engine.types import FinishReason, GenerationOutput, GenerationRequest, SamplingParams

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: web.Request, model: type[M]) -> tuple[M, bytes]:
    """The validated body and its raw bytes (a signed request's promptHash covers the bytes' JSON)."""
    if "Content-Type" not in request.headers or not _is_json(request.content_type):
        given = request.headers.get("Content-Type")
        raise UnsupportedMediaTypeError(
            f"Send the body as JSON with 'Content-Type: application/json' (got {given or 'no Content-Type'})."
        )
    if request.content_length is not None and request.content_length > request.client_max_size:
        raise PayloadTooLargeError(f"Request body too large: the limit is {request.client_max_size} bytes.")
    body = await request.read()
    try:
        return model.model_validate_json(body), body
    except ValidationError as exc:
        raise from_validation_error(exc, REQUEST_FIELD_NAMES) from None


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _refuse_unimplemented(req: ChatCompletionRequest | CompletionRequest) -> None:
    """OpenAI fields we do not implement, asked for with a value that would change the answer: a 400
    naming the field, never plain prose in their place. (JSON mode and logprobs need the sampler:
    a per-step logits mask from a grammar library, and the chosen tokens' log-probabilities.)"""

    def refuse(param: str, what: str, code: str = "unsupported_parameter") -> NoReturn:
        raise InvalidRequestError(f"{what} is not supported by this node.", param=param, code=code)

    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            refuse("logprobs", "'logprobs' (token log-probabilities)")
        return
    if req.logprobs:
        refuse("logprobs", "'logprobs' (token log-probabilities)")
    if req.top_logprobs:
        refuse("top_logprobs", "'top_logprobs' (token log-probabilities)")
    if req.response_format is not None and req.response_format.type != "text":
        what = f"'response_format' of type '{req.response_format.type}' (output constrained to JSON)"
        refuse("response_format.type", what, "unsupported_value")
    for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        chosen = getattr(req, choice)
        if chosen not in (None, "none", "auto"):
            refuse(choice, f"'{choice}' {json.dumps(chosen)[:100]} (a forced tool call)", "unsupported_value")
        if getattr(req, tools) and chosen != "none":
            refuse(tools, f"'{tools}' (tool calls; send '{choice}': \"none\" to have them ignored)")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    req, raw = await parse_body(request, ChatCompletionRequest)
    _refuse_unimplemented(req)
    if req.max_completion_tokens is not None:
        limit = ("max_completion_tokens", req.max_completion_tokens)
    else:
        limit = ("max_tokens", req.max_tokens)
    prompt_of = functools.partial(_chat_prompt_ids, messages=req.messages)
    return await _complete(request, req, raw, _ChatFormat(req.model), prompt_of, "messages", limit, started)


async def completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    req, raw = await parse_body(request, CompletionRequest)
    _refuse_unimplemented(req)
    prompt_of = functools.partial(_completion_prompt_ids, prompt=req.prompt)
    limit = ("max_tokens", req.max_tokens)
    return await _complete(request, req, raw, _CompletionFormat(req.model), prompt_of, "prompt", limit, started)


def _chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    if tokenizer.chat_template is None:
        raise InvalidRequestError("This model has no chat template; use /v1/completions.", param="messages")
    conversation = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        conversation.append(message)
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(
            f"The model's chat template rejected these messages: {exc}", param="messages"
        ) from exc
    # The template already wrote the special tokens (BOS, role markers): add none.
    return tokenizer.encode(text, add_special_tokens=False)


def _completion_prompt_ids(tokenizer: Any, prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise InvalidRequestError("Only one prompt per request is supported.", param="prompt", code="invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"Token ids must be in [0, {vocab}).", param="prompt", code="invalid_value")
        ids = list(prompt)
    if not ids:
        raise InvalidRequestError("The prompt is empty.", param="prompt", code="invalid_value")
    return ids


def _max_tokens(request: web.Request, field: str, requested: int | None, prompt: list[int], prompt_param: str) -> int:
    context = request.app[ENGINE].max_model_len
    if requested is not None and requested > context:
        raise InvalidRequestError(
            f"'{field}' is {requested}, more than this model's context of {context} tokens.",
            param=field,
            code="invalid_value",
        )
    room = context - len(prompt)
    if room < 1:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context} tokens, and the prompt has {len(prompt)}.",
            param=prompt_param,
        )
    if requested is None:
        return min(request.app[SETTINGS].default_max_tokens, room)
    if requested > room:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context} tokens; you asked for {len(prompt) + requested} "
            f"({len(prompt)} in the prompt, {requested} for the completion). Shorten the prompt or {field}.",
            param=prompt_param,
        )
    return requested


def _sampling(req: GenerationBody, max_tokens: int) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=tuple(s for s in stop if s),
        ignore_eos=bool(req.ignore_eos),
    )


class _ChatFormat:
    """The bodies and chunks of /v1/chat/completions."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def body(self, text: str, finish: str, usage: Usage) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def delta(self, text: str, finish: str | None) -> BaseModel:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=finish)])

    def usage(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


class _CompletionFormat:
    """The bodies and chunks of /v1/completions (streamed chunks are `text_completion` objects too)."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model

    def body(self, text: str, finish: str, usage: Usage) -> BaseModel:
        return self._completion([CompletionChoice(text=text, finish_reason=finish)], usage)

    def opening(self) -> list[BaseModel]:
        return []

    def delta(self, text: str, finish: str | None) -> BaseModel:
        return self._completion([CompletionChoice(text=text, finish_reason=finish)])

    def usage(self, usage: Usage) -> BaseModel:
        return self._completion([], usage)

    def _completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


_Format = _ChatFormat | _CompletionFormat


async def _complete(
    request: web.Request,
    req: GenerationBody,
    raw: bytes,
    fmt: _Format,
    prompt_of: Callable[[Any], list[int]],
    prompt_param: str,
    limit: tuple[str, int | None],
    started: float,
) -> web.StreamResponse:
    """The phases of a generation request: authorise -> generate -> record -> respond.

    Authorising opens with the headers alone (`accounting.admit`: an unsigned request a node refuses costs no
    name resolution and no chain read), then tokenizes (the signed inputTokens is checked against it) and runs the
    checks that need no adapter (`accounting.precheck`: a garbage signature or a payer without escrow here costs
    no name resolution, which can read the registry and fetch from IPFS) before resolving the name. The
    record is signed and journaled before the response completes: in the body of a non-streaming answer, as
    the last event before `[DONE]` of a stream. A stream whose client leaves midway is recorded for the tokens
    already sent; a request that ends before any token reached the client is not recorded and costs nothing."""
    engine = request.app[ENGINE]
    signed = accounting.admit(request)  # before the name is resolved: an unsigned flood reads nothing on chain
    # Any other name is an adapter's (404 if no source knows it), resolved once: authorisation prices the
    # adapter the engine then serves, even if its name is re-pointed on chain meanwhile.
    adapter = None if req.model == engine.model_name else req.model
    prompt_ids = await asyncio.get_running_loop().run_in_executor(None, prompt_of, engine.tokenizer)
    max_tokens = _max_tokens(request, *limit, prompt_ids, prompt_param)
    admitted = await accounting.precheck(request, signed, raw, len(prompt_ids))  # before the name: see below
    # A free request is as public as GET /v1/models/<name> (the node's lookup bucket); a signed one draws from
    # its payer's bucket: one wei of escrow passes the precheck, and must not buy endless registry reads.
    payer = None if admitted is None else admitted.request.payer
    resolved = None if adapter is None else await resolve_limited(request.app, adapter, payer)
    grant = await accounting.authorise(
        request, admitted, req.model, resolved.cid if resolved else None, adapter is not None
    )
    if grant is not None:
        max_tokens = min(max_tokens, grant.max_tokens)
    gen = GenerationRequest(fmt.id, prompt_ids, _sampling(req, max_tokens), resolved.key if resolved else None)
    run = _Run(request, gen, started)
    sent: list[str] = []
    sent_tokens = 0
    receipt = None
    try:
        async with aclosing(run.outputs()) as outputs:
            if not req.stream:
                text = "".join([out.text async for out in outputs])
                usage = _usage(run.last)
                receipt = await accounting.record(request, grant, adapter or "", text, usage.completion_tokens)
                body = fmt.body(text, _finish_name(run.last), usage).model_dump(mode="json")
                if receipt is not None:
                    body[RECEIPT_FIELD] = receipt.to_json()
                return web.json_response(body, dumps=_dumps)
            # Wait for the first token before sending headers: a failure up to here is a plain error status.
            out = await anext(outputs, None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            request[STREAM_RESPONSE] = response
            for chunk in fmt.opening():
                await _send(response, chunk)
            while out is not None:
                if out.text or out.finished:
                    await _send(response, fmt.delta(out.text, _finish_name(out) if out.finished else None))
                    sent.append(out.text)
                    sent_tokens = out.completion_tokens
                out = await anext(outputs, None)
        usage = _usage(run.last)
        receipt = await accounting.record(request, grant, adapter or "", "".join(sent), usage.completion_tokens)
    except BaseException:
        if receipt is None and not sent:
            accounting.release(request, grant)
        elif receipt is None and grant is not None:
            # The client has tokens it signed for: record them even though the handler is being cancelled.
            text = "".join(sent)
            await asyncio.shield(accounting.record(request, grant, adapter or "", text, sent_tokens))
        raise
    if req.stream_options is not None and req.stream_options.include_usage:
        await _send(response, fmt.usage(usage))
    if receipt is not None:
        await response.write(
            b"data: " + _dumps({"object": RECEIPT_EVENT_OBJECT, RECEIPT_FIELD: receipt.to_json()}).encode() + b"\n\n"
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _send(response: web.StreamResponse, chunk: BaseModel) -> None:
    await response.write(b"data: " + chunk.model_dump_json().encode() + b"\n\n")


class _Run:
    """One request's trip through the engine: remembers the last output, records TTFT and token counts."""

    def __init__(self, request: web.Request, gen: GenerationRequest, started: float) -> None:
        self.engine = request.app[ENGINE]
        self.metrics = request.app[METRICS]
        self.endpoint = endpoint_label(request)
        self.gen = gen
        self.started = started
        self.last: GenerationOutput | None = None

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        try:
            async with aclosing(self.engine.generate(self.gen)) as outputs:
                async for out in outputs:
                    if self.last is None:
                        ttft = time.perf_counter() - self.started
                        self.metrics.time_to_first_token.labels(self.endpoint).observe(ttft)
                    self.last = out
                    if out.finish_reason is FinishReason.ABORT:
                        raise ServiceUnavailableError("The engine aborted the request (is it shutting down?).")
                    yield out
        finally:
            if self.last is not None:
                self.metrics.observe_tokens(self.endpoint, self.last.prompt_tokens, self.last.completion_tokens)


def _finish_name(out: GenerationOutput | None) -> str:
    assert out is not None and out.finish_reason is not None, "the engine ends every request with a finish reason"
    return out.finish_reason.value


def _usage(out: GenerationOutput | None) -> Usage:
    assert out is not None
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
    )
