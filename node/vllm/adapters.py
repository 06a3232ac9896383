"""The adapters loaded into vLLM's server: what the node has verified, loaded by name, unloaded when evicted.

The node fetches, verifies and validates an adapter exactly as for its own engine (the adapter
manager). Only then is it handed to vLLM: written from the validated tensors as a plain PEFT directory
the node owns (so what vLLM reads is what was checked, and no disk-cache eviction can pull the files
from under a loaded adapter), and loaded through vLLM's runtime LoRA API under the adapter's name, for
IPFS adapters its CID. Requests then reach vLLM with `model` = that name, so a re-published adapter
(another CID) never meets another one's prefix cache. A local adapter whose files change gets a new
vLLM name (`name@<digest>`) for the same reason.

At most `capacity` adapters stay loaded: the least recently used one that no request holds is
unloaded (and its directory removed) when another comes in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from node.adapters.peft_format import CONFIG_FILE, SUPPORTED_MODULES, WEIGHTS_FILE, BaseModelShape, LoraAdapter
from node.vllm.client import VllmClient, VllmError, VllmUnreachableError

log = logging.getLogger(__name__)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def zero_adapter(base: BaseModelShape, name: str) -> LoraAdapter:
    """A rank-1 adapter of zeros on every module of every layer: the base model's output, exactly."""
    weights = {}
    for layer in range(base.num_layers):
        for module in SUPPORTED_MODULES:
            fan_in, fan_out = base.in_out(module)
            weights[(layer, module)] = (torch.zeros(1, fan_in), torch.zeros(fan_out, 1))
    return LoraAdapter(name=name, rank=1, scale=1.0, target_modules=SUPPORTED_MODULES, weights=weights)


def weights_digest(adapter: LoraAdapter) -> str:
    """sha256 over the adapter's rank, scale and tensors: equal digests, equal adapters."""
    h = hashlib.sha256(f"{adapter.rank}:{adapter.scale!r}".encode())
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        h.update(f"{layer}.{module}".encode())
        h.update(a.numpy().tobytes())
        h.update(b.numpy().tobytes())
    return h.hexdigest()


def write_peft(adapter: LoraAdapter, path: Path) -> None:
    """The validated adapter as a PEFT directory (fp32 weights; scale as lora_alpha / r)."""
    tensors = {}
    for (layer, module), (a, b) in adapter.weights.items():
        block = "self_attn" if module in _ATTENTION else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.scale * adapter.rank,
        "target_modules": list(adapter.target_modules),
        "bias": "none",
        "lora_dropout": 0.0,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


@dataclass
class _Held:
    name: str  # the node's name of the adapter (a CID, or a local adapter's name)
    lora_name: str  # vLLM's name for this content
    digest: str
    adapter: LoraAdapter  # the manager's object: the same object means the same content
    refs: int = 0
    loaded: bool = False


class HeldAdapters:
    def __init__(self, client: VllmClient, directory: Path, capacity: int) -> None:
        self.client = client
        self.directory = directory
        self.capacity = capacity
        self.loads = 0
        self.unloads = 0
        self._entries: OrderedDict[str, _Held] = OrderedDict()  # by vLLM name, least recently used first
        self._current: dict[str, _Held] = {}  # node name -> the entry of its latest content
        self._first_digest: dict[str, str] = {}  # node name -> the content first loaded under that name
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # by node name
        self._trims: set[asyncio.Task] = set()
        shutil.rmtree(directory, ignore_errors=True)  # a previous run's copies
        directory.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        """The node's names of the adapters loaded in vLLM now, least recently used first."""
        return [e.name for e in self._entries.values() if e.loaded]

    async def hold(self, adapter: LoraAdapter) -> str:
        """Load `adapter` into vLLM unless it is there; returns its vLLM name. Pair with `release`."""
        async with self._locks[adapter.name]:
            entry = self._current.get(adapter.name)
            if entry is None or entry.adapter is not adapter:
                digest = await asyncio.to_thread(weights_digest, adapter)
                if entry is not None and entry.digest == digest:
                    entry.adapter = adapter  # the same content, read again by the manager
                else:
                    first = self._first_digest.setdefault(adapter.name, digest)
                    lora_name = adapter.name if digest == first else f"{adapter.name}@{digest[:16]}"
                    entry = self._entries.get(lora_name) or _Held(adapter.name, lora_name, digest, adapter)
                    self._entries[lora_name] = self._current[adapter.name] = entry
            if not entry.loaded:
                await self._load(entry)
            entry.refs += 1
            self._entries.move_to_end(entry.lora_name)
        self._schedule_trim()  # a superseded version, or one over capacity, may go now
        return entry.lora_name

    def release(self, lora_name: str) -> None:
        self._entries[lora_name].refs -= 1
        self._schedule_trim()

    async def reload(self, lora_name: str) -> None:
        """vLLM does not know an adapter it was given (its server restarted): give it again."""
        entry = self._entries[lora_name]
        async with self._locks[entry.name]:
            entry.loaded = False
            await self._load(entry)

    def forget(self) -> None:
        """vLLM's server restarted: it holds nothing now; each adapter is loaded again when next used."""
        for entry in self._entries.values():
            entry.loaded = False

    async def _load(self, entry: _Held) -> None:
        path = self.directory / entry.lora_name
        if not (path / WEIGHTS_FILE).is_file():
            await asyncio.to_thread(write_peft, entry.adapter, path)
        try:
            await self.client.load_lora(entry.lora_name, str(path))
        except VllmError as exc:
            if exc.vllm_status != 400 or "already been loaded" not in exc.message:
                raise
            # left by an earlier node on a server it did not start: replace it with what we verified
            await self.client.unload_lora(entry.lora_name)
            await self.client.load_lora(entry.lora_name, str(path))
        entry.loaded = True
        self.loads += 1
        log.info("adapter %s loaded into vLLM as %s", entry.name, entry.lora_name)

    def _schedule_trim(self) -> None:
        task = asyncio.ensure_future(self._trim())
        self._trims.add(task)
        task.add_done_callback(self._trims.discard)

    async def _trim(self) -> None:
        """Unload what no request holds and is either superseded or beyond capacity (oldest first)."""
        excess = len(self._entries) - self.capacity
        for entry in list(self._entries.values()):
            superseded = self._current.get(entry.name) is not entry
            if entry.refs > 0 or not (superseded or excess > 0):
                continue
            async with self._locks[entry.name]:
                if entry.refs > 0 or self._entries.get(entry.lora_name) is not entry:
                    continue  # held again, or gone, while we waited
                del self._entries[entry.lora_name]
                if not superseded:
                    del self._current[entry.name]
                excess -= 1
                if entry.loaded:
                    try:
                        await self.client.unload_lora(entry.lora_name)
                        self.unloads += 1
                    except VllmError as exc:  # it is gone already (e.g. its server restarted)
                        log.info("unloading adapter %s from vLLM: %s", entry.lora_name, exc)
                    except VllmUnreachableError as exc:  # down: it comes back without it anyway
                        log.warning("unloading adapter %s from vLLM failed: %s", entry.lora_name, exc)
                shutil.rmtree(self.directory / entry.lora_name, ignore_errors=True)

    async def close(self) -> None:
        for task in list(self._trims):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._trims, return_exceptions=True)
