"""A JSON-RPC endpoint in front of a real chain node that answers every `eth_getLogs` with no logs, as a
provider capping log ranges, a lagging replica or a hostile RPC can; everything else is passed through."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from attribution.devchain import free_port


class LogDroppingRpc:
    """`async with LogDroppingRpc(upstream) as rpc:` serves at `rpc.url`; `rpc.dropped` counts the hidden calls."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.url = ""
        self.dropped = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LogDroppingRpc:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if isinstance(body, list):
            return web.json_response([await self._answer(call) for call in body])
        return web.json_response(await self._answer(body))

    async def _answer(self, call: dict[str, Any]) -> dict[str, Any]:
        if call.get("method") == "eth_getLogs":
            self.dropped += 1
            return {"jsonrpc": "2.0", "id": call.get("id"), "result": []}
        async with self._session.post(self.upstream, json=call) as response:
            return await response.json()
