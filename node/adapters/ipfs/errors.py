"""IPFS exceptions. Each also inherits the matching builtin and carries a user-safe message.

`retryable` says whether asking again (later, or another gateway) can help: transport failures
are retryable; content that failed verification is final for the gateway that served it.
"""

from __future__ import annotations

import errno


class IpfsError(Exception):
    """Root of the IPFS package's exceptions. The message is safe to show to users."""

    retryable = False


class InvalidCid(IpfsError, ValueError):
    """A string or byte sequence that is not a CID."""


class UnsupportedCid(IpfsError, ValueError):
    """A CID whose codec or hash function we do not verify (only dag-pb/raw with sha2-256)."""


class CarFormatError(IpfsError, ValueError):
    """Bytes that are not a well-formed CARv1 stream."""


class TruncatedCar(CarFormatError):
    """The CAR stream ended in the middle of its header or of a block."""


class UnexpectedRoot(IpfsError, ValueError):
    """The CAR header names a root other than the CID that was requested."""

    def __init__(self, expected: str, got: list[str]) -> None:
        super().__init__(f"the CAR is for root {', '.join(got) or '(none)'}, not the requested {expected}")
        self.expected = expected
        self.got = got


class BlockHashMismatch(IpfsError, ValueError):
    """A block's bytes do not hash to the multihash in its CID: the content was altered."""

    def __init__(self, cid: str) -> None:
        super().__init__(f"block {cid} does not match its hash: the content was altered")
        self.cid = cid


class MissingBlock(IpfsError, ValueError):
    """The DAG links to a block that the CAR does not contain."""

    def __init__(self, cid: str) -> None:
        super().__init__(f"block {cid} is referenced by the DAG but missing from the CAR")
        self.cid = cid


class UnreferencedBlock(IpfsError, ValueError):
    """The CAR contains a block that is not part of the requested DAG."""

    def __init__(self, cid: str) -> None:
        super().__init__(f"block {cid} is in the CAR but not part of the requested DAG")
        self.cid = cid


class UnixFSError(IpfsError, ValueError):
    """A dag-pb node that is not valid UnixFS, or a UnixFS feature we refuse (sharding, symlinks,
    unsafe names, sizes that do not add up)."""


class SizeLimitExceeded(IpfsError, ValueError):
    """Over the caller's cap: bytes downloaded, file bytes the DAG declares, or blocks and links
    (a tiny DAG can name the same block millions of times)."""

    def __init__(self, what: str, limit: int, unit: str = "bytes") -> None:
        super().__init__(f"{what} exceeds the limit of {limit} {unit}")
        self.limit = limit


class UnsupportedEntry(IpfsError, ValueError):
    """A local path the importer will not add (symlink, device, socket, non-UTF-8 name)."""


class SourceChanged(IpfsError, RuntimeError):
    """A file changed between hashing it and writing it into the CAR."""


class StorageError(IpfsError, OSError):
    """The download could not be written to local disk (full, read-only, I/O error). Not the
    gateway's fault and not retryable elsewhere: every gateway's bytes would land on the same disk.
    `errno` is the operating system's error number (`errno.ENOSPC` for a full disk)."""

    def __init__(self, directory: str, exc: OSError) -> None:
        what = exc.strerror or str(exc) or type(exc).__name__
        super().__init__(exc.errno, f"cannot write the download to {directory}: {what}")
        self.directory = directory
        self.cause = what  # the system's words, without the path: "No space left on device"

    def __str__(self) -> str:
        return str(self.args[1])

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class GatewayError(IpfsError, ConnectionError):
    """One gateway failed to deliver (connection refused, HTTP error, not a CAR)."""

    def __init__(self, gateway: str, reason: str, *, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(f"gateway {gateway}: {reason}")
        self.gateway = gateway
        self.retryable = retryable
        self.status = status  # the HTTP status, when the gateway answered with an error


class GatewayTimeout(GatewayError, TimeoutError):
    """A gateway stopped sending (or never started) within the timeout."""

    def __init__(self, gateway: str, timeout: float) -> None:
        super().__init__(gateway, f"no data for {timeout:g} s")


class AllGatewaysFailed(IpfsError, ConnectionError):
    """Every gateway failed; `errors` holds each attempt's exception, in order."""

    def __init__(self, cid: str, errors: list[IpfsError]) -> None:
        reasons = "; ".join(str(e) for e in errors) or "no gateways configured"
        super().__init__(f"could not fetch {cid}: {reasons}")
        self.cid = cid
        self.errors = errors
        self.retryable = any(e.retryable for e in errors)


class KuboRpcError(IpfsError, RuntimeError):
    """The Kubo RPC API answered with an error, or could not be reached."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class PinError(KuboRpcError):
    """The IPFS node imported the blocks but could not pin a root."""


class LocalNodeError(IpfsError, RuntimeError):
    """The local development IPFS node could not be started."""
