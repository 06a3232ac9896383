"""Fetch a DAG from IPFS trustless gateways (`GET /ipfs/<cid>?format=car`), verified as it streams.

The gateway is not trusted: whatever it sends goes through `VerifiedDownload`, which checks every
block against its CID and rebuilds the files itself. A gateway that fails (unreachable, HTTP
error, silent for `timeout` seconds) is retried `retries` times with exponential backoff; one
that sends bad content is not asked again. Then the next gateway is tried, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiohttp
from multiformats import CID

from node.adapters.ipfs.car import CAR_MEDIA_TYPE
from node.adapters.ipfs.cids import parse_cid
from node.adapters.ipfs.errors import (
    AllGatewaysFailed,
    GatewayError,
    GatewayTimeout,
    IpfsError,
    SizeLimitExceeded,
    StorageError,
)
from node.adapters.ipfs.http import HttpClient
from node.adapters.ipfs.verifier import VerifiedDownload

DEFAULT_TIMEOUT = 30.0
# Depth-first without duplicates is what Kubo's `dag export` writes; the verifier accepts any order.
CAR_ACCEPT = f"{CAR_MEDIA_TYPE}; version=1; order=dfs; dups=n"
_FEED_BATCH = 1024 * 1024  # bytes handed to the verifier thread at a time
T = TypeVar("T")


class GatewayClient(HttpClient):
    """One trustless gateway, e.g. `http://127.0.0.1:8080` or `https://trustless-gateway.link`.

    `timeout` bounds connecting and every wait for the next bytes; `total_timeout` (optional)
    bounds a whole download, against a gateway that drips bytes just fast enough.
    """

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        total_timeout: float | None = None,
    ) -> None:
        super().__init__(url, session)
        self.timeout = timeout
        self.total_timeout = total_timeout

    async def fetch(self, cid: CID | str, dest: Path, *, max_bytes: int, durable: bool = True) -> Path:
        """Download the DAG under `cid` as a CAR, verify it, and materialize it at `dest`
        (a path that must not exist; a directory or a file, as the DAG's root is)."""
        cid = parse_cid(cid)
        url = f"{self.url}/ipfs/{cid}?format=car"
        timeout = aiohttp.ClientTimeout(total=self.total_timeout, connect=self.timeout, sock_read=self.timeout)
        try:
            async with self.session().get(url, headers={"Accept": CAR_ACCEPT}, timeout=timeout) as resp:
                self._check_response(resp, cid, max_bytes)
                with VerifiedDownload(cid, dest, max_bytes=max_bytes, durable=durable) as download:
                    await self._stream(resp, download)
                    return await _in_thread(download.commit)
        except TimeoutError:
            raise GatewayTimeout(self.url, self.timeout) from None
        except aiohttp.ClientPayloadError:
            raise GatewayError(self.url, "the connection broke off in the middle of the response") from None
        except aiohttp.ClientError as exc:
            raise GatewayError(self.url, f"request failed ({type(exc).__name__})") from None

    def _check_response(self, resp: aiohttp.ClientResponse, cid: CID, max_bytes: int) -> None:
        if resp.status != 200:
            retryable = resp.status == 429 or resp.status >= 500
            reason = f"HTTP {resp.status} for {cid}"
            if resp.status in (404, 410):
                reason = f"does not have {cid} (HTTP {resp.status})"
            raise GatewayError(self.url, reason, retryable=retryable, status=resp.status)
        content_type = resp.headers.get("Content-Type", "")
        if content_type and not content_type.startswith(CAR_MEDIA_TYPE):
            raise GatewayError(self.url, f"answered {content_type.split(';')[0]!r}, not a CAR", retryable=False)
        if resp.content_length is not None and resp.content_length > max_bytes:
            raise SizeLimitExceeded(f"the CAR announced by {self.url} ({resp.content_length} bytes)", max_bytes)

    async def _stream(self, resp: aiohttp.ClientResponse, download: VerifiedDownload) -> None:
        # Hashing and writing run in a worker thread, a batch at a time, so the event loop stays
        # free while a large adapter arrives.
        batch: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            batch.append(chunk)
            size += len(chunk)
            if size >= _FEED_BATCH:
                await _in_thread(_feed_all, download, batch)
                batch, size = [], 0
        if batch:
            await _in_thread(_feed_all, download, batch)


def _feed_all(download: VerifiedDownload, chunks: list[bytes]) -> None:
    for chunk in chunks:
        download.feed(chunk)


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run `fn` in a worker thread. If we are cancelled meanwhile, wait for it anyway before
    re-raising: it writes through file descriptors that leaving the download closes."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def fetch_verified(
    cid: CID | str,
    gateways: Sequence[str | GatewayClient],
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout: float = DEFAULT_TIMEOUT,
    total_timeout: float | None = None,
    retries: int = 1,
    backoff: float = 0.5,
    durable: bool = True,
) -> Path:
    """Fetch `cid` from the first gateway that delivers it intact; returns `dest_dir / str(cid)`.

    `gateways` are tried in order: URLs (with `timeout` and `total_timeout`) or `GatewayClient`s
    (with their own timeouts and session).

    Raises `FileExistsError` if that path exists, `StorageError` as soon as the download cannot be
    written locally (no other gateway can help with a full disk), and `AllGatewaysFailed` (its
    `errors` list says what each attempt hit) if no gateway delivered. Nothing is left in
    `dest_dir` on failure.
    """
    cid = parse_cid(cid)
    dest = Path(dest_dir) / str(cid)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(str(dest.parent), exc) from exc
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    errors: list[IpfsError] = []
    for gateway in gateways:
        client = (
            gateway
            if isinstance(gateway, GatewayClient)
            else GatewayClient(gateway, timeout=timeout, total_timeout=total_timeout)
        )
        try:
            for attempt in range(retries + 1):
                try:
                    return await client.fetch(cid, dest, max_bytes=max_bytes, durable=durable)
                except StorageError:
                    raise
                except IpfsError as exc:
                    errors.append(exc)
                    if not exc.retryable or attempt == retries:
                        break
                    await asyncio.sleep(backoff * 2**attempt)
        finally:
            if client is not gateway:
                await client.aclose()
    raise AllGatewaysFailed(str(cid), errors)
