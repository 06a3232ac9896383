"""Exception root of the attribution package.

Each error also inherits the builtin it refines, so callers can catch either, and carries a message safe
to show to a user (no key material, no raw RPC payloads beyond a revert's decoded name and arguments).
"""

from __future__ import annotations


class AttributionError(Exception):
    """Root of every error raised by `attribution`."""


class SignatureError(AttributionError, ValueError):
    """A signature is malformed, high-s, or does not recover."""


class ChainError(AttributionError, RuntimeError):
    """The chain could not be reached or a transaction failed."""


class ContractRevert(ChainError):
    """A contract call or transaction reverted; `error` is the custom error's name, `args` its values."""

    def __init__(self, error: str, args: tuple[object, ...] = (), raw: str = "") -> None:
        self.error = error
        self.error_args = args
        self.raw = raw
        rendered = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
        super().__init__(f"{error}({rendered})")


class DeploymentError(AttributionError, ValueError):
    """A deployment configuration or deployments file is invalid."""


class DevchainError(AttributionError, RuntimeError):
    """The local development chain (anvil) could not be started."""
