"""The node's HTTP client for vLLM's OpenAI-compatible server (the node is its only client).

Generation goes through `/v1/completions` with the prompt as token ids (the node tokenizes, so both
engines see the same ids), streamed, with `return_token_ids` and per-chunk usage: each chunk brings
the new text, the new token ids and the running token counts. Closing a stream early closes its
connection, which is how vLLM's server learns to abort the request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from node.engine.errors import EngineError, EngineStoppedError


class VllmError(EngineError, RuntimeError):
    """vLLM's server refused or failed a call (its status and message): the node's failure, a 503 that
    tells the client no details."""

    def __init__(self, message: str, vllm_status: int = 500) -> None:
        super().__init__(f"vLLM answered {vllm_status}: {message}")
        self.vllm_status = vllm_status  # vLLM's HTTP status (the node answers its client 503, `status`)
        self.message = message


class VllmUnreachableError(EngineStoppedError):
    """vLLM's server cannot be reached, or the connection broke mid-request (a 503 the client may retry)."""


@dataclass(frozen=True)
class Chunk:
    """One streamed increment of a completion."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # total so far
    finish_reason: str | None


_TRANSPORT_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)


class VllmClient:
    def __init__(self, url: str, api_key: str | None = None, *, connect_timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No total timeout: a long generation streams for as long as it takes. Reads wait at most a
        # generous while between two chunks (a first chunk waits for admission and prefill).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=600)
        self._http = aiohttp.ClientSession(headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self._http.close()

    async def healthy(self, timeout: float = 5.0) -> bool:
        """vLLM's /health says 200 (its engine core is alive)."""
        try:
            async with self._http.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except _TRANSPORT_ERRORS:
            return False

    async def models(self) -> list[dict[str, Any]]:
        """vLLM's /v1/models: the base model first (with `max_model_len`), then the loaded adapters."""
        return (await self._call("GET", "/v1/models"))["data"]

    async def metrics_text(self) -> str:
        """vLLM's /metrics (Prometheus text)."""
        return await self._call("GET", "/metrics")

    async def lora_updates_allowed(self) -> bool:
        """Whether the server has its runtime LoRA API (`--enable-lora` and
        VLLM_ALLOW_RUNTIME_LORA_UPDATING): asked by unloading a name nobody loaded, which that API
        answers with its own 404, and a server without it with the router's plain "Not Found"."""
        try:
            await self.unload_lora(f"openlora-probe-{secrets.token_hex(4)}")
        except VllmError as exc:
            return exc.vllm_status == 404 and exc.message != "Not Found"
        return True

    async def load_lora(self, name: str, path: str) -> None:
        await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_lora(self, name: str) -> None:
        await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    async def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            async with self._http.request(method, f"{self.url}{path}", json=body) as response:
                text = await response.text()
        except _TRANSPORT_ERRORS as exc:
            raise VllmUnreachableError(
                f"The inference engine (vLLM) cannot be reached ({type(exc).__name__}); retry shortly."
            ) from exc
        if response.status != 200:
            raise VllmError(_error_message(text), response.status)
        return json.loads(text) if response.content_type == "application/json" else text

    async def complete(self, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        """Stream a `/v1/completions` request (`body` without the streaming fields, which are set here)."""
        body = {
            **body,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "return_token_ids": True,
        }
        try:
            async with self._http.post(f"{self.url}/v1/completions", json=body) as response:
                if response.status != 200:
                    raise VllmError(_error_message(await response.text()), response.status)
                finished = False
                try:
                    async for chunk in _events(response):
                        finished = finished or chunk.finish_reason is not None
                        yield chunk
                finally:
                    if not finished:
                        response.close()  # drop the connection: vLLM aborts the request
        except _TRANSPORT_ERRORS as exc:
            raise VllmUnreachableError(
                f"The connection to the inference engine (vLLM) failed ({type(exc).__name__}); retry shortly."
            ) from exc


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    """The chunks of a server-sent event stream, up to `[DONE]`. Each carries the running usage
    (`continuous_usage_stats`), so the usage-only chunk that closes the stream adds nothing."""
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            raise VllmError(error.get("message", str(error)), error.get("code") or 500)
        if not event.get("choices"):
            continue
        choice, usage = event["choices"][0], event.get("usage") or {}
        yield Chunk(
            choice.get("text", ""),
            choice.get("token_ids") or [],
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            choice.get("finish_reason"),
        )
    raise VllmUnreachableError("The inference engine (vLLM) ended the stream early; retry shortly.")


def _error_message(text: str) -> str:
    """vLLM's error JSON ({"error": {"message": ...}}, or FastAPI's {"detail": ...}) or the raw text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if not isinstance(body, dict):
        return text[:500]
    error = body.get("error", body.get("detail", body))
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)
