"""Start and stop the local IPFS node (`scripts/ipfs-node`, Helia under Node.js) for development
and tests, and for `openlora serve` when no IPFS API is configured.

The node binds its two ports itself (0 = any free port) and prints one JSON line when it serves:
`{"event": "ready", "api": "http://...", "gateway": "http://...", ...}`; nothing else goes to its
stdout. Its log (stderr) is appended to `<repo>/node.log`. It holds our end of a pipe as stdin and
exits when that closes, so it cannot outlive this process even if we are killed. Once started it
keeps its ports: a restart binds the same ones, so URLs handed out stay valid
(`node.adapters.ipfs.supervisor` restarts a node that died).

    with LocalIpfsNode(repo_dir) as ipfs:            # or: async with LocalIpfsNode(repo_dir)
        KuboRpcClient(ipfs.api_url); fetch_verified(cid, [ipfs.gateway_url], ...)
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from node.adapters.ipfs.errors import IpfsError, LocalNodeError
from node.adapters.ipfs.kubo import KuboRpcClient

NODE_DIR = Path(__file__).resolve().parents[3] / "scripts" / "ipfs-node"  # in a source checkout
_LOG_TAIL_BYTES = 2000


class LocalIpfsNode:
    """One local node over the repo directory `repo` (created if missing; content persists)."""

    def __init__(
        self,
        repo: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        api_port: int = 0,
        gateway_port: int = 0,
        startup_timeout: float = 60.0,
        node_binary: str = "node",
        launcher_dir: Path = NODE_DIR,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.api_port = api_port
        self.gateway_port = gateway_port
        self.startup_timeout = startup_timeout
        self.node_binary = node_binary
        self.launcher_dir = launcher_dir
        self.api_url = ""
        self.gateway_url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the node process is alive (asking also reaps it if it died: no zombie stays)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of a node that died (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.repo / "node.log"

    def start(self) -> None:
        if self.running:
            return
        if not (self.launcher_dir / "node_modules").is_dir():
            raise LocalNodeError(
                f"the local IPFS node is not installed ({self.launcher_dir / 'node_modules'} is missing): "
                "run scripts/bootstrap.sh"
            )
        node = shutil.which(self.node_binary)
        if node is None:
            raise LocalNodeError(f"Node.js ({self.node_binary!r}) is not on PATH; the local IPFS node needs Node 20+")
        self.repo.mkdir(parents=True, exist_ok=True)
        argv = [
            node, str(self.launcher_dir / "node.js"), "--repo", str(self.repo), "--host", self.host,
            "--api-port", str(self.api_port), "--gateway-port", str(self.gateway_port), "--exit-on-stdin-close",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.launcher_dir,
                start_new_session=True,  # a Ctrl-C meant for us reaches the node only through stop()
            )
        try:
            ready = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.api_url = ready["api"]
        self.gateway_url = ready["gateway"]
        self.api_port = urlsplit(self.api_url).port or self.api_port  # a restart binds the same ports
        self.gateway_port = urlsplit(self.gateway_url).port or self.gateway_port
        # Like Kubo's $IPFS_PATH/api file: other processes (the CLI) find the running node here.
        endpoints = {"api": self.api_url, "gateway": self.gateway_url, "pid": self._proc.pid}
        tmp = self.endpoints_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(endpoints))
        tmp.replace(self.endpoints_path)

    @property
    def endpoints_path(self) -> Path:
        return self.repo / "endpoints.json"

    @staticmethod
    async def running_endpoints(repo: str | os.PathLike[str], timeout: float = 3.0) -> dict[str, str] | None:
        """{"api": url, "gateway": url} of a node another process runs over `repo`, if it answers.

        The endpoints file alone proves nothing: its process may have died (or be a zombie that a
        signal-0 check calls alive), and a stale file would send commands to a dead port. So the
        node must answer its API's `version` within `timeout` seconds."""
        try:
            endpoints = json.loads((Path(repo) / "endpoints.json").read_text())
            api, gateway = str(endpoints["api"]), str(endpoints["gateway"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            async with KuboRpcClient(api, timeout=timeout) as client:
                await client.version()
        except IpfsError:
            return None
        return {"api": api, "gateway": gateway}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the node closes its stores and exits), then SIGKILL after `timeout` seconds.
        For a node that died already: reap it and remove its endpoints file."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.endpoints_path.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> LocalIpfsNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LocalIpfsNode:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _wait_ready(self) -> dict[str, str]:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LocalNodeError(
                        f"the local IPFS node did not start within {self.startup_timeout:g} s{self._log_tail()}"
                    )
                if not sel.select(left):
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    self._proc.wait()
                    raise LocalNodeError(
                        f"the local IPFS node exited with code {self._proc.returncode}{self._log_tail()}"
                    )
                line += chunk
        try:
            ready = json.loads(line)
            if ready["event"] == "ready":
                return {"api": str(ready["api"]), "gateway": str(ready["gateway"])}
        except (ValueError, KeyError, TypeError):
            pass
        raise LocalNodeError(f"unexpected output from the local IPFS node: {line[:200]!r}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                tail = f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f"; its log ({self.log_path}) ends with:\n{tail}" if tail else ""
