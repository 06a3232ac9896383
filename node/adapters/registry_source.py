"""Adapters registered on chain: the AdapterRegistry maps a name, or an adapter id, to the adapter's CID;
the content comes from IPFS by that CID, verified like any other.

A request names a registered adapter by its registry name (`sql-expert`, which its owner may move to a
new version registered under a new CID) or by its id (`adapter:7`). The registry is read through a short
TTL cache (`attribution.ledger.ChainLedger`): a name moved on chain is followed within the TTL. The
resolved CID is the adapter's identity, so a name and its CID share one download, one load and one slot.

The contract takes any string as a CID, so one content may be registered under several spellings (CIDv0,
an `ipfs://` URL, CIDv1 base32) by different owners. The node bills a content by the id registered under its
canonical CID (`attribution.accounting`), so an adapter registered under another spelling is refused here
(400 adapter_invalid): its name would otherwise be served and billed as whoever registered the canonical one.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Protocol

from attribution.errors import ChainError
from node.adapters.errors import AdapterUnavailableError, InvalidAdapterError
from node.adapters.ipfs_source import IpfsAdapterSource, parse_adapter_cid
from node.adapters.sources import AdapterSource

REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # AdapterRegistry._checkName's rule
ADAPTER_ID = re.compile(r"^adapter:([1-9][0-9]{0,19})$")
MAX_ADAPTER_ID = 2**64 - 1  # uint64


class AdapterRegistryReader(Protocol):
    """The registry reads this source needs (`attribution.ledger.ChainLedger` has them, cached)."""

    async def adapter_id_by_name(self, name: str) -> int:
        """The adapter `name` points to, 0 if none."""
        ...

    async def registered_cid(self, adapter_id: int, at: int) -> str | None:
        """The adapter's CID, None when there is no such adapter or it is retired at `at` (unix seconds)."""
        ...


class RegistryAdapterSource(AdapterSource):
    """Names and ids of the on-chain AdapterRegistry -> CIDs; content through `ipfs` (sharing its disk cache)."""

    content_addressed = True

    def __init__(self, registry: AdapterRegistryReader, ipfs: IpfsAdapterSource) -> None:
        self.registry = registry
        self.ipfs = ipfs

    def names(self) -> list[str]:
        return []  # the registry is not enumerated: any registered name or id may be requested

    async def canonical(self, name: str) -> str | None:
        adapter_id = _adapter_id(name)
        try:
            if adapter_id is None:
                if not REGISTRY_NAME.match(name) or parse_adapter_cid(name) is not None:
                    return None  # no name the registry accepts (a CID is the IPFS source's)
                adapter_id = await self.registry.adapter_id_by_name(name)
                if adapter_id == 0:
                    return None
            cid = await self.registry.registered_cid(adapter_id, int(time.time()))
        except ChainError as exc:
            raise AdapterUnavailableError(f"the adapter registry cannot be read now ({exc})", "registry") from None
        if cid is None:
            return None
        canonical = parse_adapter_cid(cid)
        if canonical is None:
            raise InvalidAdapterError(
                f"adapter {adapter_id} is registered under {_shown(cid)}, which is no CID this node can fetch",
                "registry_cid",
            )
        if canonical != cid:
            # The node bills an adapter's content as the id registered under its canonical CID (the same one a
            # request naming the CID gets); another spelling of that CID may be registered to someone else.
            raise InvalidAdapterError(
                f"adapter {adapter_id} is registered under {_shown(cid)}, not under its canonical CID {canonical}; "
                "this node serves and bills registered adapters by their canonical CID only",
                "registry_cid",
            )
        return canonical

    async def fetch(self, key: str) -> Path:
        return await self.ipfs.fetch(key)

    def accepted(self, key: str) -> None:
        self.ipfs.accepted(key)

    def refused(self, key: str) -> None:
        self.ipfs.refused(key)


def _shown(text: str, limit: int = 100) -> str:
    """`text` quoted for a message, cut to `limit` characters (a registered CID is any string its owner chose)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _adapter_id(name: str) -> int | None:
    """The id in `adapter:<id>`, None for any other name (or an id beyond uint64)."""
    match = ADAPTER_ID.match(name)
    if match is None or int(match.group(1)) > MAX_ADAPTER_ID:
        return None
    return int(match.group(1))
