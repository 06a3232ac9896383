"""A local development chain: anvil from the npm package `@foundry-rs/anvil-linux-amd64`.

`Anvil` starts the binary on a free loopback port and stops it (terminate, then kill); it works as a
plain or an async context manager, so test fixtures and the node's devnet mode share it:

    with Anvil.start() as chain:            # or: async with Anvil() as chain
        print(chain.rpc_url, chain.private_keys[0])
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from eth_account import Account

from attribution.errors import DevchainError

ANVIL_BINARY = (
    Path(__file__).resolve().parent.parent
    / "contracts" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
)
DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
DEFAULT_CHAIN_ID = 31337


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dev_private_keys(count: int, mnemonic: str = DEFAULT_MNEMONIC) -> list[str]:
    """Private keys anvil funds for `mnemonic` (path m/44'/60'/0'/0/i)."""
    Account.enable_unaudited_hdwallet_features()
    return [
        Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{i}").key.hex() for i in range(count)
    ]


class Anvil:
    """One anvil process. Construct, then `start()` (or use it as a context manager)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, accounts: int = 10,
                 chain_id: int = DEFAULT_CHAIN_ID, binary: Path = ANVIL_BINARY,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.host = host
        self.port = port
        self.accounts = accounts
        self.chain_id = chain_id
        self.binary = binary
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.private_keys: list[str] = []

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start_new(cls, **kwargs: object) -> Anvil:
        anvil = cls(**kwargs)  # type: ignore[arg-type]
        anvil.start()
        return anvil

    def start(self, timeout: float = 15.0) -> Anvil:
        if not self.binary.exists():
            raise DevchainError(f"anvil not found at {self.binary}: run `npm ci --prefix contracts`")
        fixed_port = self.port
        for _ in range(1 if fixed_port else 3):  # a probed free port can be taken before anvil binds it
            self.port = fixed_port or free_port(self.host)
            self.process = subprocess.Popen(
                [str(self.binary), "--host", self.host, "--port", str(self.port), "--accounts", str(self.accounts),
                 "--chain-id", str(self.chain_id), "--mnemonic", DEFAULT_MNEMONIC, "--silent", *self.extra_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(timeout):
                self.private_keys = dev_private_keys(self.accounts)
                return self
            self.stop()
        raise DevchainError(f"anvil did not start on {self.host}:{self.port}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                request = urllib.request.Request(self.rpc_url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=1) as response:
                    if json.loads(response.read()).get("result"):
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Anvil:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Anvil:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.stop)
