"""Adapter exceptions. Each also inherits the matching builtin and carries a user-safe message, and
declares what it means to a client (`node.errors.ClientFacingError`)."""

from node.errors import ClientFacingError


class AdapterError(ClientFacingError):
    """Root of the adapter subsystem's exceptions."""


class InvalidAdapterError(AdapterError, ValueError):
    """The adapter failed validation (format, base model, shapes, values, limits): never loaded.

    `reason` is a short stable code for metrics (e.g. "pickle", "base_model", "rank", "shape").
    """

    status = 400
    code = "adapter_invalid"
    param = "model"
    internal = False

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason

    def client_message(self) -> str:
        return f"The adapter cannot be used: {self}"


class AdapterUnavailableError(AdapterError, RuntimeError):
    """The adapter could not be fetched or loaded right now (retried later with backoff).

    `reason` is a short stable code for metrics (e.g. "unavailable", "disk_full", "disk_error").
    """

    status = 503
    code = "adapter_unavailable"
    internal = False

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason

    def client_message(self) -> str:
        return f"The adapter is not available now: {self}"


class AdapterNotFoundError(AdapterError, LookupError):
    """No source has the adapter (e.g. every gateway answered 404 for its CID)."""

    reason = "not_found"
    status = 404
    code = "model_not_found"
    param = "model"
    internal = False

    def client_message(self) -> str:
        return f"The model does not exist: {self}"
