"""The node's adapter sources and manager, built from Settings.

The node owns adapters: `create_app` builds the manager here and hands it to the engine
(`AsyncEngine.load(settings, adapters=...)`), which only ever receives verified, validated adapters.
Nothing here imports the engine; the base model's shape comes in as a value
(`node.engine.prepare.served_base_shape`).
"""

from __future__ import annotations

from pathlib import Path

from node.adapters.ipfs_source import DiskCache, IpfsAdapterSource
from node.adapters.manager import AdapterManager
from node.adapters.peft_format import BaseModelShape
from node.adapters.sources import AdapterSource, LocalAdapterSource
from node.config import Settings


def adapter_sources(settings: Settings) -> list[AdapterSource]:
    """A local directory of adapters and/or IPFS (by CID or indexed name), as configured."""
    sources: list[AdapterSource] = []
    if settings.adapters_dir is not None:
        sources.append(LocalAdapterSource(Path(settings.adapters_dir)))
    if settings.ipfs_gateways:
        sources.append(
            IpfsAdapterSource(
                settings.ipfs_gateways,
                DiskCache(settings.adapter_cache_dir, settings.adapter_cache_bytes),
                index_file=settings.adapter_index,
                max_adapter_bytes=settings.max_adapter_bytes,
                timeout=settings.ipfs_timeout,
            )
        )
    return sources


def adapter_manager(settings: Settings, base: BaseModelShape) -> AdapterManager | None:
    """The manager over the configured sources, validating against `base`; None when no source
    is configured (the node then serves its base model only)."""
    sources = adapter_sources(settings)
    if not sources:
        return None
    return AdapterManager(
        sources,
        base,
        settings.max_lora_rank,
        host_capacity=settings.host_adapters,
        max_bytes=settings.max_adapter_bytes,
    )
