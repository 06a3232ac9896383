"""Model names to adapters, for the handlers: one resolution per request, through the app's adapter manager."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from node.api.errors import unknown_model
from node.api.keys import ADAPTERS


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter a request named, as resolved once for that request."""

    key: str  # its identity in its source: what the engine is handed, so a name re-pointed meanwhile changes nothing
    cid: str | None  # its CID when its source is content-addressed (payable on chain), else None


async def resolve_adapter(app: web.Application, name: str) -> ResolvedAdapter:
    """The adapter `name` refers to (a local directory, a CID, an indexed name, a name or id in the on-chain
    registry); 404 when no source knows it, 503 (AdapterUnavailableError) when a source cannot tell now."""
    adapters = app.get(ADAPTERS)
    found = await adapters.resolve(name) if adapters is not None else None
    if found is None:
        raise unknown_model(name)
    source, key = found
    return ResolvedAdapter(key, key if source.content_addressed else None)
