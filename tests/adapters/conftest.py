"""Fixtures for the adapter and IPFS tests.

- `ipfs_node`: the real local IPFS node (Helia, `scripts/ipfs-node`) on free ports with a temp
  repo, one per session; it is the honest gateway and the Kubo RPC API.
- `helia_add`: Helia's own UnixFS importer through the node's Kubo-style `/api/v0/add`, with
  Kubo's options: the cross-check for our importer's CIDs.
- `serve_gateway`: small aiohttp servers that play misbehaving gateways (adversaries, not mocks
  of IPFS: they serve crafted CARs, hang, or fail).
- `adapter_dir`: a real PEFT adapter for the tiny model; `publish`, `cli` and `chat` drive the
  real IPFS node, the `openlora` command and a node's API; `serve_process` runs `openlora serve`
  as a real process (for faults that need one: a kill, a mount namespace of its own).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from node.adapters.ipfs import KuboRpcClient, LocalIpfsNode, import_directory
from node.adapters.synthetic import make_random_adapter

OPENLORA = Path(sys.executable).parent / "openlora"  # the console script pyproject declares
PROMPT = [{"role": "user", "content": "The capital of France is"}]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="session")
def ipfs_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIpfsNode]:
    node = LocalIpfsNode(tmp_path_factory.mktemp("ipfs-repo"))
    node.start()
    try:
        yield node
    finally:
        node.stop()


async def add_to_helia(
    api_url: str,
    files: dict[str, bytes | None],
    *,
    cid_version: int = 1,
    chunk_size: int = 262144,
    pin: bool = False,
) -> dict[str, str]:
    """`ipfs add` through the node's `/api/v0/add`: `files` maps paths to bytes (None = an empty
    directory); returns {path: CID} for every file and directory added."""
    form = aiohttp.FormData()  # it percent-encodes file names, as Kubo's clients do
    for path, data in files.items():
        if data is None:
            form.add_field("file", b"", filename=path, content_type="application/x-directory")
        else:
            form.add_field("file", data, filename=path, content_type="application/octet-stream")
    params = {
        "cid-version": str(cid_version),
        "chunker": f"size-{chunk_size}",
        "pin": "true" if pin else "false",
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{api_url}/api/v0/add", params=params, data=form) as resp:
            body = await resp.text()
            assert resp.status == 200, body
    return {entry["Name"]: entry["Hash"] for entry in map(json.loads, body.splitlines())}


@pytest.fixture
def helia_add(ipfs_node: LocalIpfsNode) -> Callable[..., Awaitable[dict[str, str]]]:
    async def add(files: dict[str, bytes | None], **options: object) -> dict[str, str]:
        return await add_to_helia(ipfs_node.api_url, files, **options)  # type: ignore[arg-type]

    return add


@pytest.fixture
async def serve_gateway() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """`url = await serve_gateway(handler)`: a server answering `GET /ipfs/{cid}` with `handler`."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/ipfs/{cid}", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def tree_files(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and empty directory (None) under `root`, by relative path."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file():
            out[rel] = path.read_bytes()
        elif path.is_dir() and not any(path.iterdir()):
            out[rel] = None
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local-adapters")
    make_random_adapter(tiny_model_dir, root / "good", rank=8, seed=3, std=0.2)
    return root / "good"


async def publish(api_url: str, directory: Path) -> str:
    async with KuboRpcClient(api_url) as client:
        return str(await client.publish(import_directory(directory)))


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(OPENLORA), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


async def chat(url: str, model: str, n: int = 12) -> str:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
        resp = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
        )
        return resp.choices[0].message.content


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    url: str
    log: list[str] = field(default_factory=list)  # its stderr, lines so far


@contextmanager
def serve_process(*args: str, prefix: Sequence[str] = (), timeout: float = 120) -> Iterator[ServeProcess]:
    """`[*prefix] openlora serve --port 0 *args` until its "serving ... at URL" line; SIGTERM on exit."""
    proc = subprocess.Popen([*prefix, str(OPENLORA), "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keeps reading, so that a chatty log never fills the pipe and blocks serve
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    served = ServeProcess(proc, "")
    try:
        while not served.url:
            line = lines.get(timeout=timeout)
            assert line is not None, f"serve exited early: {''.join(served.log)}"
            served.log.append(line)
            if match := re.search(r"serving \S+ at (http://\S+)", line):
                served.url = match.group(1)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        while (line := lines.get(timeout=10)) is not None:
            served.log.append(line)
