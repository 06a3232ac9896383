"""Model names to adapters, for the handlers: one resolution per request, through the app's adapter manager."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from node.api.errors import unknown_model
from node.api.keys import ADAPTERS, LOOKUPS, PAYER_LOOKUPS
from node.api.lookups import LookupLimiter


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


async def resolve_limited(app: web.Application, name: str, payer: str | None = None) -> ResolvedAdapter:
    """`resolve_adapter`, drawing first from a lookup bucket (429 when empty, `node/api/lookups.py`): the
    node's for a public lookup (GET /v1/models/<name>, a free generation request), the payer's for a signed
    request; nothing when a source on this machine has the name, or the name was answered lately (in that
    bucket) and its adapter is still in host memory."""
    adapters = app.get(ADAPTERS)
    if adapters is not None and not await adapters.known_locally(name):  # no source: 404, costing nothing
        _limiter(app, payer).admit(name, adapters.resident)
    resolved = await resolve_adapter(app, name)
    _limiter(app, payer).answered(name, resolved.key)  # free again only while its adapter stays in host memory
    return resolved


def _limiter(app: web.Application, payer: str | None) -> LookupLimiter:
    return app[LOOKUPS] if payer is None else app[PAYER_LOOKUPS].of(payer)
