"""The API's exceptions and the one middleware that turns every failure into OpenAI error JSON.

Handlers raise `APIError` subclasses (or let domain errors, aiohttp's HTTP exceptions and bugs
propagate); `error_middleware` maps each to a status and `{"error": {message, type, param, code}}`.
Domain errors (the engine's, the adapters') declare their own status, code and parameter
(`node.errors.ClientFacingError`) and are mapped by that declaration alone.
Each subclass also inherits the builtin it resembles, so callers outside HTTP can catch it naturally.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from node.adapters.ipfs_source import cid_problem
from node.api.keys import STREAM_RESPONSE
from node.api.schemas import ErrorBody, ErrorResponse
from node.errors import ClientFacingError

log = logging.getLogger(__name__)

ERROR_TYPES = {401: "authentication_error", 403: "permission_error"}  # 4xx statuses whose type is not invalid_request


class APIError(Exception):
    """Root of the API's exceptions. `message` is shown to the client verbatim: keep it user-safe."""

    status = 500
    type = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))


class InvalidRequestError(APIError, ValueError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class NotFoundError(APIError, LookupError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    code = "model_not_found"


def unknown_model(name: str) -> ModelNotFoundError:
    """404 for a name no source knows; a malformed or unsupported CID says what is wrong with it."""
    message = f"The model {name!r} does not exist on this node."
    problem = cid_problem(name)
    if problem is not None:
        message += f" It is no CID this node can fetch: {problem}."
    return ModelNotFoundError(message, param="model")


class UnsupportedMediaTypeError(APIError, ValueError):
    """A body that is not JSON by its Content-Type. Browsers send text/plain, form and multipart
    bodies cross-origin without a CORS preflight; refusing them keeps web pages from driving a node."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class MethodNotAllowedError(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, method: str, allowed: list[str]) -> None:
        super().__init__(f"Method {method} not allowed here; allowed: {', '.join(allowed)}.")
        self.headers = {"Allow": ", ".join(allowed)}


class PayloadTooLargeError(APIError, ValueError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailableError(APIError, RuntimeError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class InternalError(APIError, RuntimeError):
    status = 500
    type = "server_error"
    code = "internal_error"


class DeclaredError(APIError):
    """A domain error (`node.errors.ClientFacingError`: the engine's, the adapters') as it declares itself:
    its status, code, parameter and client message; the type follows from the status."""

    def __init__(self, status: int, message: str, *, param: str | None, code: str | None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")

    @classmethod
    def of(cls, exc: ClientFacingError, request: web.Request) -> DeclaredError:
        if exc.internal:
            log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
        param = exc.param
        if param == "prompt" and request.path == "/v1/chat/completions":
            param = "messages"  # the chat endpoint's prompt
        return cls(exc.status, exc.client_message(), param=param, code=exc.code)


def from_validation_error(exc: ValidationError, field_names: frozenset[str]) -> InvalidRequestError:
    """The first pydantic error as an OpenAI-style 400 whose `param` is the field path, e.g. `messages[0].role`.

    Pydantic puts union member tags (`str`, `list[int]`) into error locations; `field_names` (every
    field of the request models) tells them apart from real fields so they can be dropped.
    """
    errors = exc.errors(include_url=False)
    # A union reports one error per member; the deepest one says the most (`content[0].type`).
    err = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
    if err["type"] == "json_invalid":
        return InvalidRequestError(
            f"We could not parse the JSON body of your request: {err['msg']}", code="invalid_json"
        )
    path = ""
    for part in err["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in field_names:
            path += f".{part}" if path else part
    param = path or None
    kind = err["type"]
    if kind == "missing":
        code, what = "missing_required_parameter", "Missing required parameter"
    elif kind.endswith(("_type", "_parsing")):
        code, what = "invalid_type", "Invalid type for"
    else:
        code, what = "invalid_value", "Invalid value for"
    if param is None:
        return InvalidRequestError(f"Invalid request body: {err['msg']}", code=code)
    return InvalidRequestError(f"{what} '{param}': {err['msg']}.", param=param, code=code)


def to_api_error(exc: Exception, request: web.Request) -> APIError:
    """Map any exception escaping a handler to the APIError the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientFacingError):
        return DeclaredError.of(exc, request)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLargeError(f"Request body too large: the limit is {request.client_max_size} bytes.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowedError(exc.method, sorted(exc.allowed_methods))
    if isinstance(exc, web.HTTPNotFound):
        return NotFoundError(f"No route {request.method} {request.path}.", code="unknown_url")
    if isinstance(exc, web.HTTPClientError):
        return InvalidRequestError(exc.reason)
    log.error("unhandled error", exc_info=exc)
    return InternalError("Internal server error.")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only place that writes error responses."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = to_api_error(exc, request)
    except ConnectionError:
        raise  # the client went away: nobody left to tell
    except Exception as exc:
        error = to_api_error(exc, request)
    body = error.body().model_dump_json().encode()
    stream = request.get(STREAM_RESPONSE)
    if stream is not None and stream.prepared:
        # The status line is gone already: report in-band, as OpenAI does, and end the stream.
        await stream.write(b"data: " + body + b"\n\n")
        await stream.write_eof()
        return stream
    return web.Response(status=error.status, body=body, content_type="application/json", headers=error.headers)
