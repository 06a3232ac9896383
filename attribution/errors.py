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


class ClientError(AttributionError):
    """Root of the dApp client's errors (`attribution.client`): every one has a message fit for one CLI line."""


class RequestBuildError(ClientError, ValueError):
    """The client cannot build or sign a request from these inputs (bad body, prompt, caps, key, tokenizer)."""


class CapStateError(ClientError, OSError):
    """The local cumulative-cap state file cannot be read or written."""


# What a payer can do about a refusal, by the node's error code (attribution/checks.py), else by status.
REFUSAL_HINTS: dict[str | int, str] = {
    "invalid_signed_request": "the X-OpenLoRA-Request header is malformed (see docs/dapp.md, Headers)",
    "invalid_signature": "sign under the domain from GET /v1/attribution with a 65-byte low-s signature",
    "signer_not_authorized": "authorise the key in the PaymentEscrow (authorizeSigner) or sign with the payer's key",
    "signer_revoked": "the signer is being revoked: sign with the payer's key or another authorised signer",
    "request_expired": "sign a new request with a fresh deadline (check the clock)",
    "signature_required": "this node serves signed requests only",
    "max_charge_too_low": "raise maxCharge to the model's prices and the node's fee times the caps",
    "insufficient_escrow": "deposit more for this node (PaymentEscrow.deposit(node, amount)) or lower the caps",
    "wrong_node": "sign the request for this node's address (GET /v1/attribution)",
    "request_conflict": "the interval overlaps one the node has seen: resync the counter and sign a new request",
    "deadline_too_far": "use a deadline at most maxRequestTtl seconds ahead (check the clock)",
    "prompt_hash_mismatch": "sign the hash of exactly the body you send (RFC 8785 canonical JSON)",
    "input_tokens_mismatch": "count inputTokens with the node's base model tokenizer and chat template",
    "adapter_mismatch": "sign the model's adapterId from GET /v1/models",
    "adapter_not_registered": "this adapter is not registered on chain, so it cannot be paid for",
    "attribution_unavailable": "this node has no chain: send the request unsigned",
    401: "the signature or the signer is not accepted: check the key and the chain the node runs on",
    402: "the caps or the escrow do not cover what the request can cost",
    403: "the request names another node",
    409: "the cumulativeCap interval overlaps one the node has seen: resync the counter and sign a new request",
    422: "a signed field does not match the body or the node's rules (prompt hash, inputTokens, deadline, adapter)",
}


class NodeRefusedError(ClientError, RuntimeError):
    """The node answered with an error status; `status` and `code` come from its OpenAI-style error body."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        self.status = status
        self.code = code
        self.node_message = message
        hint = REFUSAL_HINTS.get(code or status) or REFUSAL_HINTS.get(status)
        super().__init__(
            f"node refused the request ({status}{' ' + code if code else ''}): {message}"
            + (f" — {hint}" if hint else "")
        )


class NodeUnavailableError(ClientError, ConnectionError):
    """The node could not be reached, or it answered something that is not the OpenLoRA wire format."""


class RecordError(ClientError, ValueError):
    """The node's usage record is missing or fails verification; the answer must not be trusted as billed."""


class JournalError(AttributionError):
    """The usage journal (`attribution.storage`) refused an operation or could not complete it."""


class InvalidJournalInput(JournalError, ValueError):
    """A usage entry, interval or transition argument is malformed."""


class DuplicateEntry(JournalError, ValueError):
    """An entry with this request digest is already in the journal."""

    def __init__(self, digest: bytes) -> None:
        self.digest = digest
        super().__init__(f"request 0x{digest.hex()} is already in the journal")


class UnknownEntry(JournalError, LookupError):
    """No entry has this request digest."""

    def __init__(self, digests: list[bytes]) -> None:
        self.digests = digests
        shown = ", ".join(f"0x{d.hex()}" for d in digests[:3]) + (" ..." if len(digests) > 3 else "")
        super().__init__(f"{len(digests)} request(s) not in the journal: {shown}")


class IllegalTransition(JournalError, ValueError):
    """A state change the journal's state machine does not allow; nothing of the call was applied."""

    def __init__(self, digest: bytes, current: str, batch_id: int | None, target: str, target_batch: int | None):
        self.digest, self.current, self.target = digest, current, target
        here = current if batch_id is None else f"{current} in batch {batch_id}"
        there = target if target_batch is None else f"{target} in batch {target_batch}"
        super().__init__(f"request 0x{digest.hex()} is {here}: it cannot become {there}")


class IntervalConflict(JournalError, ValueError):
    """A request's interval overlaps one this node already accepted for the payer (HTTP 409)."""

    def __init__(self, payer: str, requested: tuple[int, int], existing: tuple[int, int]) -> None:
        self.payer, self.requested, self.existing = payer, requested, existing
        super().__init__(
            f"interval ({requested[0]}, {requested[1]}] of payer {payer} overlaps the accepted "
            f"interval ({existing[0]}, {existing[1]}]"
        )


class JournalLocked(JournalError, RuntimeError):
    """Another process (or another open journal) holds the journal file."""


class JournalClosed(JournalError, RuntimeError):
    """The journal was closed; nothing more is written."""
