"""Every domain error (node.errors.ClientFacingError: the engine's, the adapters') comes back as the status,
code, parameter and message it declares, through the real error middleware of a served aiohttp app; the
node's own failures tell the client nothing of their details."""

from __future__ import annotations

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

import node.adapters.errors
import node.engine.errors
import node.vllm.client
import node.vllm.environment
import node.vllm.server
from node.api.errors import error_middleware
from node.api.server import start_server
from node.errors import ClientFacingError

assert node.adapters.errors and node.engine.errors and node.vllm.client  # imported for their subclasses
assert node.vllm.environment and node.vllm.server

pytestmark = pytest.mark.asyncio(loop_scope="module")


def domain_errors() -> list[type[ClientFacingError]]:
    found, todo = [], [ClientFacingError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__qualname__)


ERRORS = domain_errors()
DETAIL = "a detail only the node should see"


async def test_every_domain_error_is_found() -> None:
    names = {cls.__name__ for cls in ERRORS}
    assert {"PromptTooLongError", "UnknownModelError", "EngineStoppedError", "InvalidAdapterError",
            "AdapterUnavailableError", "AdapterNotFoundError", "EngineError", "AdapterError", "VllmError",
            "VllmUnreachableError", "VllmStartError", "VllmEnvironmentError"} <= names  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def raising_server():
    """The two generation endpoints, raising the error class named in `?error=` as a handler would let it escape."""

    async def raise_it(request: web.Request) -> web.Response:
        cls = next(c for c in ERRORS if c.__qualname__ == request.query["error"])
        raise cls(DETAIL)

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/completions", raise_it)
    app.router.add_post("/v1/chat/completions", raise_it)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield url
    await runner.cleanup()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
async def test_domain_error_maps_to_what_it_declares(raising_server: str, cls: type[ClientFacingError], path) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{raising_server}{path}", params={"error": cls.__qualname__}) as response:
            status, error = response.status, (await response.json())["error"]
    param = "messages" if cls.param == "prompt" and path == "/v1/chat/completions" else cls.param
    assert status == cls.status
    assert (error["code"], error["param"], error["message"]) == (cls.code, param, cls(DETAIL).client_message())
    assert error["type"] == ("server_error" if cls.status >= 500 else "invalid_request_error")
    assert (DETAIL in error["message"]) is not cls.internal  # the node's own failures keep their details
