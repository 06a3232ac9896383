"""A client for the part of the Kubo RPC API (`POST /api/v0/...`) we use to publish: import a CAR
that we built (`dag/import`), pin it (`pin/add`), and check the node is there (`version`).

Kubo's RPC API only takes POST, answers newline-delimited JSON, and reports errors as
`{"Message": ..., "Code": ..., "Type": "error"}` with HTTP 4xx/5xx. The local Helia node
(`localnode.py`) serves the same shapes. Publishing needs no trust in the node: the CID comes
from our importer, and `publish` checks that the node reports that same root.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multiformats import CID

from node.adapters.ipfs.car import CAR_MEDIA_TYPE
from node.adapters.ipfs.cids import key_of, parse_cid
from node.adapters.ipfs.errors import KuboRpcError, PinError
from node.adapters.ipfs.http import HttpClient
from node.adapters.ipfs.importer import UnixfsDag

DEFAULT_API_URL = "http://127.0.0.1:5001"
CarSource = Path | bytes | Iterable[bytes] | AsyncIterable[bytes]


@dataclass(frozen=True)
class NodeVersion:
    version: str
    system: str
    raw: dict[str, Any]


class KuboRpcClient(HttpClient):
    """`async with KuboRpcClient(url) as ipfs: await ipfs.publish(import_directory(path))`."""

    def __init__(
        self, url: str = DEFAULT_API_URL, *, session: aiohttp.ClientSession | None = None, timeout: float = 300.0
    ) -> None:
        super().__init__(url, session)
        self.timeout = timeout

    async def version(self) -> NodeVersion:
        (answer,) = await self._call("version")
        return NodeVersion(str(answer.get("Version", "")), str(answer.get("System", "")), answer)

    async def dag_import(self, car: CarSource, *, pin_roots: bool = True) -> list[CID]:
        """Import every block of a CARv1; returns the roots of its header, which the node pinned
        (recursively) unless `pin_roots` is false. Raises `PinError` if a pin failed."""
        form = aiohttp.FormData()
        form.add_field("file", _car_payload(car), filename="dag.car", content_type=CAR_MEDIA_TYPE)
        answers = await self._call("dag/import", {"pin-roots": _flag(pin_roots)}, data=form)
        roots = []
        for answer in answers:
            root = answer.get("Root")
            if root is None:
                continue
            cid = parse_cid(root["Cid"]["/"])
            if root.get("PinErrorMsg"):
                raise PinError(f"the IPFS node imported {cid} but could not pin it: {root['PinErrorMsg']}")
            roots.append(cid)
        return roots

    async def pin_add(self, cid: CID | str) -> list[CID]:
        """Pin `cid` and everything under it; the node must already hold (or be able to find) it."""
        answers = await self._call("pin/add", {"arg": str(parse_cid(cid)), "recursive": "true"})
        return [parse_cid(p) for answer in answers for p in answer.get("Pins") or ()]

    async def publish(self, dag: UnixfsDag) -> CID:
        """Import an imported directory or file's CAR and pin its root; returns the root CID."""
        roots = await self.dag_import(dag.car_chunks())
        if [key_of(r) for r in roots] != [key_of(dag.root)]:
            raise KuboRpcError(f"the IPFS node reported roots {[str(r) for r in roots]}, expected {dag.root}")
        pinned = await self.pin_add(dag.root)
        if key_of(dag.root) not in {key_of(p) for p in pinned}:
            raise PinError(f"the IPFS node did not confirm the pin of {dag.root}")
        return dag.root

    async def _call(
        self, command: str, params: dict[str, str] | None = None, *, data: aiohttp.FormData | None = None
    ) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v0/{command}"
        try:
            async with self.session().post(
                url, params=params, data=data, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise KuboRpcError(
                        f"IPFS API {command} failed: {_error_message(body, resp.status)}",
                        retryable=resp.status >= 500 and resp.status != 501,
                    )
        except TimeoutError:
            raise KuboRpcError(f"IPFS API {command} timed out after {self.timeout:g} s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise KuboRpcError(
                f"cannot reach the IPFS API at {self.url} ({type(exc).__name__})", retryable=True
            ) from None
        try:
            return [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise KuboRpcError(f"IPFS API {command} answered something that is not JSON") from None


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _error_message(body: str, status: int) -> str:
    try:
        return str(json.loads(body)["Message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body.strip()[:200]}"


def _car_payload(car: CarSource) -> bytes | AsyncIterable[bytes] | Any:
    if isinstance(car, Path):
        return open(car, "rb")  # aiohttp streams it from a thread and closes it
    if isinstance(car, (bytes, bytearray)):
        return bytes(car)
    if isinstance(car, AsyncIterable):
        return car
    return _from_thread(iter(car))


async def _from_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking iterator (our importer reads and hashes files) as an async one, one chunk per
    trip to a worker thread so that the event loop never waits on the disk."""
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield chunk  # type: ignore[misc]
