"""The aiohttp session handling the IPFS clients share: bring your own session, or one is opened on
first use and closed with the client."""

from __future__ import annotations

from typing import Self

import aiohttp

USER_AGENT = "openlora-node"


class HttpClient:
    def __init__(self, url: str, session: aiohttp.ClientSession | None) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        return self._session
