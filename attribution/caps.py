"""The payer's running `cumulativeCap` per node, kept in a small local state file.

Every request a payer signs for a node takes the next slice of its cumulative authorisation: with the
counter at `c`, a request with cap `m` gets the interval (c, c + m] and the counter moves to c + m, so
two requests never overlap (the node refuses an overlap with 409 `request_conflict`). The counter lives
in a JSON file so it survives restarts; allocation is a read-modify-write under an exclusive `flock`,
so threads and processes sharing the file get disjoint intervals; the file is replaced atomically
(write a temporary file, fsync, rename), so a crash leaves the old or the new state, never a torn one.

The node is the other source of truth: `GET /v1/attribution/payers/<payer>` reports the highest
interval end it has seen. `observe` raises the local counter to such a value, never lowers it (a lost
state file, or a second device of the same payer, is repaired by one resync).

The counter is kept per (chainId, UsageSettlement, payer, node): a request signed for another
deployment has another EIP-712 domain, and its settlement keeps its own `collected[payer][node]`.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_utils import to_checksum_address

from attribution.errors import CapStateError, RequestBuildError

STATE_VERSION = 1
UINT128_MAX = (1 << 128) - 1


def default_state_path() -> Path:
    return Path.home() / ".local" / "state" / "openlora" / "cumulative-caps.json"


@dataclass(frozen=True, slots=True)
class CapAccount:
    """Whose counter: a payer's authorisations for one node under one settlement deployment."""

    chain_id: int
    settlement: str
    payer: str
    node: str

    @property
    def key(self) -> str:
        parts = (self.settlement, self.payer, self.node)
        return f"{self.chain_id}:" + ":".join(to_checksum_address(p) for p in parts)


class CapLedger:
    """Allocates disjoint cumulativeCap intervals from a state file shared by threads and processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_state_path()

    def current(self, account: CapAccount) -> int:
        """The highest interval end allocated (or observed) so far; 0 for a new account."""
        with self._locked():
            return self._read().get(account.key, 0)

    def allocate(self, account: CapAccount, max_charge: int) -> int:
        """Reserves the next interval of width `max_charge` and returns its end (the request's cumulativeCap)."""
        if max_charge <= 0:
            raise RequestBuildError(f"maxCharge must be positive, got {max_charge}")
        return self._update(account, lambda cap: cap + max_charge)

    def observe(self, account: CapAccount, cap: int) -> int:
        """Raises the counter to `cap` if it is higher (a resync with the node); returns the counter."""
        return self._update(account, lambda current: max(current, cap))

    def _update(self, account: CapAccount, step: Callable[[int], int]) -> int:
        with self._locked():
            caps = self._read()
            new = step(caps.get(account.key, 0))
            if new > UINT128_MAX:
                raise RequestBuildError("cumulativeCap would overflow uint128")
            if new != caps.get(account.key):
                caps[account.key] = new
                self._write(caps)
            return new

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CapStateError(f"cannot open the cap state lock {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also if the process dies
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, int]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CapStateError(f"cannot read the cap state file {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            return {key: int(value) for key, value in data["caps"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CapStateError(
                f"the cap state file {self.path} is corrupt ({exc}); move it away: the next request resyncs "
                "the counter from the node"
            ) from None

    def _write(self, caps: dict[str, int]) -> None:
        data = {"version": STATE_VERSION, "caps": {key: str(value) for key, value in sorted(caps.items())}}
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself is durable only once the directory is
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise CapStateError(f"cannot write the cap state file {self.path}: {exc.strerror}") from exc
