"""Engine exceptions. Each also inherits the matching builtin and carries a user-safe message, and
declares what it means to a client (`node.errors.ClientFacingError`)."""

from node.errors import ClientFacingError


class EngineError(ClientFacingError):
    """Root of the engine's exceptions: by default the engine failed, a 503 that tells no details."""

    status = 503
    code = "service_unavailable"
    internal_message = "The inference engine failed to serve this request."


class ModelNotFoundError(EngineError, FileNotFoundError):
    """The base model directory is missing or not a supported model."""


class ModelLoadError(EngineError, RuntimeError):
    """The model directory exists but its weights or tokenizer cannot be loaded."""


class UnknownModelError(EngineError, LookupError):
    """A request named a model (base or adapter) this node does not serve."""

    status = 404
    code = "model_not_found"
    param = "model"
    internal = False

    def __init__(self, name: str) -> None:
        super().__init__(f"The model {name!r} does not exist on this node.")
        self.name = name


class PromptTooLongError(EngineError, ValueError):
    """Prompt plus requested completion does not fit the context or the KV cache."""

    status = 400
    code = "context_length_exceeded"
    param = "prompt"
    internal = False


class EngineStoppedError(EngineError, RuntimeError):
    """The engine is not running (stopped, its thread died, or vLLM's server is down or being restarted):
    a 503 the client may retry, with nothing charged."""

    code = "engine_unavailable"
    internal = False
