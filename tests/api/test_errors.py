"""Every error case: status and OpenAI error JSON, with raw requests and through the openai client."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from tests.api.conftest import MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL, Node, chat_body

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG_PROMPT = "Hello world! " * MAX_MODEL_LEN  # well over the context in tokens
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}

# (id, path, body, status, type, code, param)
CASES = [
    ("malformed-json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400,
     "invalid_request_error", "invalid_json", None),
    ("empty-body", "/v1/completions", b"", 400, "invalid_request_error", "invalid_json", None),
    ("not-an-object", "/v1/completions", b"[1, 2]", 400, "invalid_request_error", "invalid_type", None),
    ("unknown-model", "/v1/chat/completions", {**chat_body(), "model": "nope"}, 404,
     "invalid_request_error", "model_not_found", "model"),
    ("unknown-model-completions", "/v1/completions", {"model": "nope", "prompt": "x"}, 404,
     "invalid_request_error", "model_not_found", "model"),
    ("chat-prompt-too-long", "/v1/chat/completions", chat_body(LONG_PROMPT), 400,
     "invalid_request_error", "context_length_exceeded", "messages"),
    ("prompt-too-long", "/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, 400,
     "invalid_request_error", "context_length_exceeded", "prompt"),
    ("prompt-plus-max-tokens-too-long", "/v1/completions",
     {"model": MODEL, "prompt": "Hi", "max_tokens": MAX_MODEL_LEN},
     400, "invalid_request_error", "context_length_exceeded", "prompt"),
    ("max-tokens-zero", "/v1/chat/completions", chat_body(max_tokens=0), 400,
     "invalid_request_error", "invalid_value", "max_tokens"),
    ("max-tokens-over-context", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN + 1},
     400, "invalid_request_error", "invalid_value", "max_tokens"),
    ("max-completion-tokens-negative", "/v1/chat/completions", chat_body(max_completion_tokens=-1), 400,
     "invalid_request_error", "invalid_value", "max_completion_tokens"),
    ("max-tokens-float", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2.5}, 400,
     "invalid_request_error", "invalid_type", "max_tokens"),
    ("temperature-string", "/v1/chat/completions", chat_body(temperature="hot"), 400,
     "invalid_request_error", "invalid_type", "temperature"),
    ("temperature-out-of-range", "/v1/chat/completions", chat_body(temperature=2.5), 400,
     "invalid_request_error", "invalid_value", "temperature"),
    ("stream-not-bool", "/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400,
     "invalid_request_error", "invalid_type", "stream"),
    ("stop-wrong-type", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": 5}, 400,
     "invalid_request_error", "invalid_type", "stop"),
    ("include-usage-wrong-type", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": 1}},
     400, "invalid_request_error", "invalid_type", "stream_options.include_usage"),
    ("content-wrong-type", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
     400, "invalid_request_error", "invalid_type", "messages[0].content"),
    ("content-part-wrong-type", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "invalid_request_error", "invalid_value", "messages[0].content[0].type"),
    ("role-unknown", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     400, "invalid_request_error", "invalid_value", "messages[0].role"),
    ("messages-missing", "/v1/chat/completions", {"model": MODEL}, 400,
     "invalid_request_error", "missing_required_parameter", "messages"),
    ("messages-empty", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400,
     "invalid_request_error", "invalid_value", "messages"),
    ("model-missing", "/v1/completions", {"prompt": "x"}, 400,
     "invalid_request_error", "missing_required_parameter", "model"),
    ("n-2", "/v1/chat/completions", chat_body(n=2), 400, "invalid_request_error", "invalid_value", "n"),
    ("two-prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400,
     "invalid_request_error", "invalid_value", "prompt"),
    ("empty-prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400,
     "invalid_request_error", "invalid_value", "prompt"),
    ("token-id-out-of-vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 10**6]}, 400,
     "invalid_request_error", "invalid_value", "prompt"),
    ("body-too-large", "/v1/chat/completions", chat_body("x" * MAX_BODY_BYTES), 413,
     "invalid_request_error", "request_too_large", None),
    ("temperature-nan", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "invalid_request_error", "invalid_value", "temperature"),
    ("top-p-infinity", "/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', 400,
     "invalid_request_error", "invalid_value", "top_p"),
    # OpenAI fields the node does not implement: refused, never answered with plain prose
    ("logprobs", "/v1/chat/completions", chat_body(logprobs=True), 400,
     "invalid_request_error", "unsupported_parameter", "logprobs"),
    ("top-logprobs", "/v1/chat/completions", chat_body(top_logprobs=1), 400,
     "invalid_request_error", "unsupported_parameter", "top_logprobs"),
    ("logprobs-completions", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 0}, 400,
     "invalid_request_error", "unsupported_parameter", "logprobs"),
    ("json-object", "/v1/chat/completions", chat_body(response_format={"type": "json_object"}), 400,
     "invalid_request_error", "unsupported_value", "response_format.type"),
    ("json-schema", "/v1/chat/completions",
     chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
     400, "invalid_request_error", "unsupported_value", "response_format.type"),
    ("response-format-unknown", "/v1/chat/completions", chat_body(response_format={"type": "yaml"}), 400,
     "invalid_request_error", "invalid_value", "response_format.type"),
    ("tools", "/v1/chat/completions", chat_body(tools=[TOOL]), 400,
     "invalid_request_error", "unsupported_parameter", "tools"),
    ("tool-choice-required", "/v1/chat/completions", chat_body(tools=[TOOL], tool_choice="required"), 400,
     "invalid_request_error", "unsupported_value", "tool_choice"),
    ("tool-choice-forced", "/v1/chat/completions",
     chat_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "weather"}}), 400,
     "invalid_request_error", "unsupported_value", "tool_choice"),
    ("functions", "/v1/chat/completions", chat_body(functions=[TOOL["function"]]), 400,
     "invalid_request_error", "unsupported_parameter", "functions"),
]  # fmt: skip

# Their neutral values change nothing, so they are served.
NEUTRAL = {
    "logprobs-false": chat_body(logprobs=False, top_logprobs=0),
    "response-format-text": chat_body(response_format={"type": "text"}),
    "tools-with-choice-none": chat_body(tools=[TOOL], tool_choice="none"),
    "choice-auto-without-tools": chat_body(tool_choice="auto"),
}


def _body(body: bytes | dict) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def assert_error(payload: dict, status: int, type_: str, code: str | None, param: str | None) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, param), error


@pytest.mark.parametrize(("path", "body", "status", "type_", "code", "param"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_error_json(http: aiohttp.ClientSession, node: Node, path, body, status, type_, code, param):
    headers = {"Content-Type": "application/json"}
    async with http.post(path, data=_body(body), headers=headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert_error(await resp.json(), status, type_, code, param)
    await node.wait_idle()  # a rejected request holds nothing


@pytest.mark.parametrize("body", NEUTRAL.values(), ids=NEUTRAL.keys())
async def test_neutral_values_of_unimplemented_fields_are_served(http: aiohttp.ClientSession, body: dict):
    async with http.post("/v1/chat/completions", json={**body, "max_tokens": 2}) as resp:
        assert resp.status == 200, await resp.text()


async def test_openai_client_json_mode_and_logprobs_are_refused(client: openai.AsyncOpenAI):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    for extra, param in [({"response_format": {"type": "json_object"}}, "response_format.type"),
                         ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
                         ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**request, **extra)
        assert info.value.param == param and info.value.code.startswith("unsupported_")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", "multipart/form-data",
     "application/octet-stream", "text/json"],
)  # fmt: skip
async def test_bodies_not_sent_as_json_are_415(http: aiohttp.ClientSession, node: Node, content_type: str | None):
    """text/plain, form and multipart are what a web page may POST cross-origin without a CORS preflight."""
    headers = {"Content-Type": content_type} if content_type else {}
    skip = () if content_type else ("Content-Type",)
    for path, body in [("/v1/chat/completions", chat_body()), ("/v1/completions", {"model": MODEL, "prompt": "x"})]:
        async with http.post(path, data=json.dumps(body), headers=headers, skip_auto_headers=skip) as resp:
            assert resp.status == 415
            assert_error(await resp.json(), 415, "invalid_request_error", "unsupported_media_type", None)
    await node.wait_idle()


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                          "application/vnd.openlora+json"])  # fmt: skip
async def test_json_content_types_are_served(http: aiohttp.ClientSession, content_type: str):
    body = json.dumps(chat_body(max_tokens=2))
    async with http.post("/v1/chat/completions", data=body, headers={"Content-Type": content_type}) as resp:
        assert resp.status == 200, await resp.text()


async def test_error_in_stream_request_is_a_plain_error_status(http: aiohttp.ClientSession):
    async with http.post("/v1/completions", json={"model": MODEL, "prompt": LONG_PROMPT, "stream": True}) as resp:
        assert resp.status == 400 and resp.content_type == "application/json"
        assert_error(await resp.json(), 400, "invalid_request_error", "context_length_exceeded", "prompt")


async def test_unknown_route(http: aiohttp.ClientSession):
    async with http.get("/v1/nothing-here") as resp:
        assert resp.status == 404
        assert_error(await resp.json(), 404, "not_found_error", "unknown_url", None)


async def test_wrong_method(http: aiohttp.ClientSession):
    async with http.get("/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert_error(await resp.json(), 405, "invalid_request_error", "method_not_allowed", None)


@pytest.mark.parametrize(
    ("kwargs", "exc_type", "code", "param"),
    [
        ({"model": "nope"}, openai.NotFoundError, "model_not_found", "model"),
        ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, openai.BadRequestError,
         "context_length_exceeded", "messages"),
        ({"max_tokens": 0}, openai.BadRequestError, "invalid_value", "max_tokens"),
        ({"max_tokens": MAX_MODEL_LEN + 1}, openai.BadRequestError, "invalid_value", "max_tokens"),
        ({"temperature": "hot"}, openai.BadRequestError, "invalid_type", "temperature"),
        ({"n": 3}, openai.BadRequestError, "invalid_value", "n"),
        ({"stream": True, "model": "nope"}, openai.NotFoundError, "model_not_found", "model"),
    ],
    ids=["unknown-model", "context-length", "max-tokens-zero", "max-tokens-over-context", "wrong-type", "n-3",
         "stream-unknown-model"],
)  # fmt: skip
async def test_openai_client_exceptions(client: openai.AsyncOpenAI, kwargs, exc_type, code, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(exc_type) as info:
        await client.chat.completions.create(**request)
    assert (info.value.type, info.value.code, info.value.param) == ("invalid_request_error", code, param)


async def test_openai_client_body_too_large(client: openai.AsyncOpenAI):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * MAX_BODY_BYTES}])
    assert info.value.status_code == 413 and info.value.code == "request_too_large"


async def test_openai_client_unknown_route_and_wrong_method(client: openai.AsyncOpenAI):
    with pytest.raises(openai.NotFoundError):
        await client.get("/nothing-here", cast_to=object)
    with pytest.raises(openai.APIStatusError) as info:
        await client.get("/chat/completions", cast_to=object)
    assert info.value.status_code == 405 and info.value.code == "method_not_allowed"


async def test_failure_after_the_stream_started_is_an_error_event(http: aiohttp.ClientSession, node: Node):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with http.post("/v1/completions", json=body) as resp:
        assert resp.status == 200
        first = json.loads((await resp.content.readline()).removeprefix(b"data: "))
        node.engine.runner.abort(first["id"])  # as if the engine shut down under the request
        events = [line.removeprefix(b"data: ") async for line in resp.content if line.startswith(b"data: ")]
    assert b"[DONE]" not in events
    assert_error(json.loads(events[-1]), 503, "server_error", "service_unavailable", None)
    await node.wait_idle()


async def test_openai_client_raises_on_an_error_event(client: openai.AsyncOpenAI, node: Node):
    stream = await client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            node.engine.runner.abort(chunk.id)
    assert info.value.code == "service_unavailable"
