"""Engine exceptions. Each also inherits the matching builtin and carries a user-safe message."""


class EngineError(Exception):
    """Root of the engine's exceptions."""


class ModelNotFoundError(EngineError, FileNotFoundError):
    """The base model directory is missing or not a supported model."""


class ModelLoadError(EngineError, RuntimeError):
    """The model directory exists but its weights or tokenizer cannot be loaded."""


class UnknownModelError(EngineError, LookupError):
    """A request named a model (base or adapter) this node does not serve."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the model {name!r} does not exist on this node")
        self.name = name


class PromptTooLongError(EngineError, ValueError):
    """Prompt plus requested completion does not fit the context or the KV cache."""


class EngineStoppedError(EngineError, RuntimeError):
    """The engine is not running (stopped, or its thread died)."""
