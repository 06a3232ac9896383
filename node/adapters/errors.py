"""Adapter exceptions. Each also inherits the matching builtin and carries a user-safe message."""


class AdapterError(Exception):
    """Root of the adapter subsystem's exceptions."""


class InvalidAdapterError(AdapterError, ValueError):
    """The adapter failed validation (format, base model, shapes, values, limits): never loaded.

    `reason` is a short stable code for metrics (e.g. "pickle", "base_model", "rank", "shape").
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class AdapterUnavailableError(AdapterError, RuntimeError):
    """The adapter could not be fetched or loaded right now (retried later with backoff).

    `reason` is a short stable code for metrics (e.g. "unavailable", "disk_full", "disk_error").
    """

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class AdapterNotFoundError(AdapterError, LookupError):
    """No source has the adapter (e.g. every gateway answered 404 for its CID)."""

    reason = "not_found"
