"""The node's adapter sources and manager, built from Settings.

The node owns adapters: `create_app` builds the manager here and hands it to the engine
(`AsyncEngine.load(settings, adapters=...)`), which only ever receives verified, validated adapters.
Nothing here imports the engine; the base model's shape comes in as a value
(`node.engine.prepare.served_base_shape`), the registry reader as the node's cached chain ledger.
"""

from __future__ import annotations

from pathlib import Path

from node.adapters.ipfs_source import DiskCache, IpfsAdapterSource
from node.adapters.manager import AdapterManager
from node.adapters.peft_format import BaseModelShape
from node.adapters.registry_source import AdapterRegistryReader, RegistryAdapterSource
from node.adapters.sources import AdapterSource, LocalAdapterSource
from node.config import Settings


def adapter_sources(settings: Settings, registry: AdapterRegistryReader | None = None) -> list[AdapterSource]:
    """The configured sources, in the order a name is looked up: a local directory of adapters; IPFS (by
    CID, or by a name in the adapter index); with a chain (`registry`) and IPFS, the on-chain
    AdapterRegistry (by registered name or `adapter:<id>`, content from IPFS)."""
    sources: list[AdapterSource] = []
    if settings.adapters_dir is not None:
        sources.append(LocalAdapterSource(Path(settings.adapters_dir)))
    if settings.ipfs_gateways:
        ipfs = IpfsAdapterSource(
            settings.ipfs_gateways,
            DiskCache(settings.adapter_cache_dir, settings.adapter_cache_bytes),
            index_file=settings.adapter_index,
            max_adapter_bytes=settings.max_adapter_bytes,
            timeout=settings.ipfs_timeout,
        )
        sources.append(ipfs)
        if registry is not None:
            sources.append(RegistryAdapterSource(registry, ipfs))
    return sources


def adapter_manager(
    settings: Settings, base: BaseModelShape, registry: AdapterRegistryReader | None = None
) -> AdapterManager | None:
    """The manager over the configured sources, validating against `base`; None when no source
    is configured (the node then serves its base model only)."""
    sources = adapter_sources(settings, registry)
    if not sources:
        return None
    return AdapterManager(
        sources,
        base,
        settings.max_lora_rank,
        host_capacity=settings.host_adapters,
        max_bytes=settings.max_adapter_bytes,
    )
