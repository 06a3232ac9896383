"""The package layering the design decides: the node owns adapters (sources, fetching, verification,
validation) and hands the manager to the engine; the engine never builds or imports adapter sources,
and the adapter package never imports the engine. Checked in a fresh interpreter, by what each
import actually loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What the engine may take from node.adapters: the validated adapter type, its format checks and errors.
ENGINE_MAY_IMPORT = {"node.adapters", "node.adapters.peft_format", "node.adapters.errors"}


def _loaded_after(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize(("module", "engine"), [("node.engine", "AsyncEngine"), ("node.vllm.engine", "VllmEngine")])
def test_the_engines_load_no_adapter_source(module, engine):
    loaded = _loaded_after(module)
    assert module in loaded  # the import did load the engine
    adapters = {m for m in loaded if m == "node.adapters" or m.startswith("node.adapters.")}
    assert adapters <= ENGINE_MAY_IMPORT, f"{engine} loads adapter sources: {sorted(adapters - ENGINE_MAY_IMPORT)}"


@pytest.mark.parametrize("module", ["node.adapters.factory", "node.adapters.manager", "node.adapters.ipfs_source"])
def test_the_adapter_package_loads_no_engine(module):
    loaded = _loaded_after(module)
    assert module in loaded
    assert not {m for m in loaded if m.startswith("node.engine")}, f"{module} loads the engine"
