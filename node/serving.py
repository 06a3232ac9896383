"""An engine with the node's adapters, outside the HTTP app: for benchmarks, tests and peers.

`create_app` wires the same parts in its cleanup contexts (node/api/app.py): the base model's
shape, the adapter manager over the configured sources (`node.adapters.factory`), the engine it is
handed to. The engine never builds adapter sources itself.
"""

from __future__ import annotations

from node.adapters.factory import adapter_manager
from node.config import Settings
from node.engine import AsyncEngine
from node.engine.prepare import served_base_shape
from node.threads import run_in_fresh_thread


def load_engine(settings: Settings, *, progress: bool = False) -> AsyncEngine:
    """Blocking: the engine for `settings`, handed the adapter manager its adapter settings describe
    (none configured: base model only). Run it in an executor from async code."""
    base = run_in_fresh_thread(lambda: served_base_shape(settings, progress=progress))  # may convert the model
    return AsyncEngine.load(settings, adapters=adapter_manager(settings, base), progress=progress)
