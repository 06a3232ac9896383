"""What a failure of the node's parts means to a client, declared by the failure itself.

The engine's and the adapters' exceptions derive from `ClientFacingError` and say which HTTP status,
OpenAI error code and request parameter they come back as, and the message a client may read. The API
maps any of them the same way (`node.api.errors.to_api_error`), so a new domain error needs no new
branch there, and neither package imports the API.
"""

from __future__ import annotations

from typing import ClassVar


class ClientFacingError(Exception):
    """An exception a request can end in. Subclasses override the class attributes.

    `param` names the request field at fault in the completions API's terms ("model", "prompt"); the
    chat endpoint's prompt is its "messages". `internal` failures are the node's, not the request's:
    the API logs them with their traceback and tells the client only `internal_message`."""

    status: ClassVar[int] = 500
    code: ClassVar[str | None] = "internal_error"
    param: ClassVar[str | None] = None
    internal: ClassVar[bool] = True
    internal_message: ClassVar[str] = "Internal server error."

    def client_message(self) -> str:
        """What the client is told (user-safe)."""
        return self.internal_message if self.internal else str(self)
