"""The asyncio face of the engine: `await`-able generation over the engine thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

import kernels
from node.adapters.errors import AdapterError
from node.config import Settings
from node.engine.admission import check_fits
from node.engine.errors import EngineStoppedError, ModelLoadError, PromptTooLongError, UnknownModelError
from node.engine.lora import LoraSlotPool, make_layout
from node.engine.model import LlamaModel
from node.engine.prepare import base_model_shape, prepare_model, served_name
from node.engine.runner import EngineRunner, set_threads
from node.engine.types import AdapterProvider, GenerationOutput, GenerationRequest
from node.threads import run_in_fresh_thread

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AsyncEngine:
    def __init__(
        self, runner: EngineRunner, model_name: str, max_model_len: int, adapters: AdapterProvider | None = None
    ) -> None:
        self.runner = runner
        self.adapters = adapters
        self.tokenizer = runner.tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len

    @classmethod
    def load(
        cls, settings: Settings, *, adapters: AdapterProvider | None = None, progress: bool = False
    ) -> AsyncEngine:
        """Blocking: prepares (if needed) and loads the model. Run it in an executor.

        `adapters` is the node's adapter manager (`node.adapters.factory.adapter_manager`): with
        one, the engine reserves LoRA slots and serves requests naming its adapters; without,
        it serves the base model only.

        The work runs in a thread of its own, so that its OpenMP pool ends with it (see
        node.threads): the engine thread is then the only one with a pool."""
        return run_in_fresh_thread(cls._load, settings, adapters, progress, name="openlora-load")

    @classmethod
    def _load(cls, settings: Settings, adapters: AdapterProvider | None, progress: bool) -> AsyncEngine:
        set_threads(settings.threads)
        kernels.configure(settings.kernel_config())  # before the LoRA layout picks (and builds) a kernel
        path = prepare_model(settings, progress=progress)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = LlamaModel.from_pretrained(path, dtype=resolve_dtype(settings), device=settings.device)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot load the model in {path}: {type(exc).__name__}: {exc}") from exc
        eos = set(model.cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        max_len = min(settings.max_model_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
        name = served_name(settings, path)
        pool = None
        if adapters is not None:
            base = base_model_shape(model.cfg, name, path)
            if adapters.base != base:
                raise ModelLoadError(f"the adapters were validated for {adapters.base}, but this model is {base}")
            pool = LoraSlotPool(make_layout(model, settings.max_loras, settings.max_lora_rank))
        runner = EngineRunner(
            model,
            tokenizer,
            num_kv_blocks=settings.num_kv_blocks,
            kv_block_size=settings.kv_block_size,
            max_num_seqs=settings.max_num_seqs,
            max_prefill_tokens=settings.max_prefill_tokens,
            eos_token_ids=eos,
            lora_pool=pool,
            prefix_cache_id=name if settings.prefix_caching else None,
        )
        return cls(runner, name, max_len, adapters)

    async def start(self) -> None:
        self.runner.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.runner.stop)

    async def close(self) -> None:
        """Stops for good and lets go of the model and the KV cache, so that their memory
        is freed even while something still holds this engine: aiohttp keeps its last 1,024 apps referenced
        (a middleware cache) and an app holds its engine, so without this every app a process made kept its
        model (1 GB each with SmolLM2). `healthy` stays False; nothing else may be called after it."""
        await self.stop()
        self.runner.release()

    def lora_stats(self) -> dict[str, int]:
        """Adapters in device slots now, and device loads since start (for /metrics)."""
        pool = self.runner.lora_pool
        return {"device": len(self.held_adapters()), "device_loads": pool.loads if pool is not None else 0}

    def held_adapters(self) -> list[str]:
        """The adapters in device slots now, least recently used first."""
        pool = self.runner.lora_pool
        return pool.resident() if pool is not None else []

    @property
    def healthy(self) -> bool:
        """The engine thread is running and has not died."""
        return self.runner.alive and self.runner.error is None

    def stats(self) -> dict[str, int]:
        """running, waiting, kv_blocks_used, kv_blocks_total, kv_blocks_cached (free, kept for
        their prefix), prefix_cache_hit_tokens and prefix_cache_miss_tokens (since start)."""
        return self.runner.stats()

    def check(self, request: GenerationRequest) -> None:
        """Reject what can never run, before it is queued."""
        check_fits(request, model_name=self.model_name, serves_adapters=self.adapters is not None,
                   max_model_len=self.max_model_len)  # fmt: skip
        total = len(request.prompt_token_ids) + request.sampling.max_tokens
        kv = self.runner.kv
        if kv.blocks_needed(total) > kv.allocator.num_blocks:
            raise PromptTooLongError(
                f"{total} tokens do not fit this node's KV cache ({kv.allocator.num_blocks * kv.block_size} tokens)"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs. Leaving early (break, cancel, aclose) aborts it."""
        self.check(request)
        if not self.healthy:
            raise EngineStoppedError("The inference engine is not running.")
        lora = None
        if request.adapter is not None:
            try:
                lora = await self.adapters.acquire(request.adapter)  # waits here if loading; others go on
            except LookupError as exc:
                if isinstance(exc, AdapterError):  # AdapterNotFoundError: a source said it has none
                    raise
                raise UnknownModelError(request.adapter) from None  # no source knows the name
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        finished = False
        try:
            self.runner.submit(request, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out), lora)
            while True:
                out = await queue.get()
                if out.finished:
                    finished = True
                    if self.runner.error is not None:
                        raise EngineStoppedError("The inference engine stopped while serving this request.")
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.runner.abort(request.request_id)
            if lora is not None:
                self.adapters.release(lora)


def resolve_dtype(settings: Settings) -> torch.dtype:
    """The compute dtype: as configured, or for "auto" bf16 where the hardware runs it natively."""
    if settings.dtype != "auto":
        return _DTYPES[settings.dtype]
    if settings.device.startswith("cuda"):
        return torch.bfloat16
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native_bf16 else torch.float32
