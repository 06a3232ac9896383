"""The engine loop: one thread that owns the model, the KV cache and the scheduler.

Other threads only talk to it through `submit` and `abort` (a locked inbox) and receive
`GenerationOutput`s through the callback each request was submitted with. torch releases the GIL
inside its kernels, so the asyncio loop stays responsive while a step runs.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

import torch

from node.adapters.peft_format import LoraAdapter
from node.engine.batch import StepBatch, build_batch
from node.engine.cpu_share import CpuShare
from node.engine.detokenizer import IncrementalDetokenizer
from node.engine.errors import EngineStoppedError
from node.engine.kv_cache import KVCache
from node.engine.lora import LoraSlotPool
from node.engine.model import LlamaModel
from node.engine.prefix_cache import adapter_digest, root_key
from node.engine.sampling import make_generator, sample
from node.engine.scheduler import Scheduler, Sequence
from node.engine.types import FinishReason, GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)

OutputCallback = Callable[[GenerationOutput], None]


class EngineRunner:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer,
        *,
        num_kv_blocks: int,
        kv_block_size: int,
        max_num_seqs: int,
        max_prefill_tokens: int,
        eos_token_ids: set[int],
        lora_pool: LoraSlotPool | None = None,
        prefix_cache_id: str | None = None,
    ) -> None:
        """prefix_cache_id: the base model's identity, which the key chains of base requests
        start from (node/engine/prefix_cache.py); None turns prefix caching off."""
        cfg = model.cfg
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.kv = KVCache(
            cfg.num_layers, num_kv_blocks, kv_block_size, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device
        )
        self.lora_pool = lora_pool
        model.lora = lora_pool
        self.scheduler = Scheduler(
            self.kv, max_num_seqs, max_prefill_tokens, acquire=self._acquire_slot, release=self._release_slot
        )
        self.prefix_cache_id = prefix_cache_id
        # name of an adapter without a CID -> (the LoraAdapter it was computed for, its key-chain root)
        self._digest_roots: dict[str, tuple[weakref.ref[LoraAdapter], bytes]] = {}
        self._seqs: dict[str, Sequence] = {}  # by request id: everything submitted and not finished
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.max_threads = torch.get_num_threads()  # as configured (settings.threads)
        self.threads = self.max_threads  # what the engine thread computes with: fewer while others take the CPUs
        self.steps = 0
        self.generated_tokens = 0
        self.error: BaseException | None = None

    # -- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (again, after stop(): its OpenMP pool went with the old thread)."""
        if self.alive:
            return
        self._stop = False
        self.error = None
        self._thread = threading.Thread(target=self._loop, name="openlora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._abort_everything()

    def release(self) -> None:
        """After `stop`, for good: drops the model and the KV cache (and the scheduler over it), the bulk of
        the memory, so it can be freed while this runner is still referenced; the adapter slot pool stays
        (readable counters, a few tens of MB). It cannot start again."""
        self.model = self.kv = self.scheduler = None  # type: ignore[assignment]
        self._seqs.clear()
        self._digest_roots.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest, callback: OutputCallback, lora: LoraAdapter | None = None) -> None:
        """Queue a request; `lora` is its adapter, already validated and held in host memory."""
        if lora is not None and self.lora_pool is None:
            raise ValueError("this engine was built without LoRA slots")
        seq = Sequence(
            lora=lora,
            callback=callback,
            request=request,
            detok=IncrementalDetokenizer(self.tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling),
            tokens=list(request.prompt_token_ids),
            num_prompt=len(request.prompt_token_ids),
        )
        with self._cond:
            if self._stop or self.error is not None:
                raise EngineStoppedError("the engine is not running")
            self._inbox.append(seq)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        alloc = self.kv.allocator
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": alloc.num_used,
            "kv_blocks_total": alloc.num_blocks,
            "kv_blocks_cached": alloc.num_cached,
            "threads": self.threads,
            "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
            "prefix_cache_miss_tokens": self.scheduler.prefix_miss_tokens,
        }

    # -- the engine thread ---------------------------------------------------------------------

    def _acquire_slot(self, seq: Sequence) -> bool:
        if seq.lora is None:
            return True
        slot = self.lora_pool.acquire(seq.lora)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _prefix_root(self, lora: LoraAdapter | None) -> bytes | None:
        """Where the sequence's block keys start: the base model's name, the adapter's CID, or
        for an adapter without one a digest of its weights, computed once per adapter object (a
        local adapter reloaded after an edit is a new object)."""
        if self.prefix_cache_id is None:
            return None
        if lora is None:
            return root_key(f"base:{self.prefix_cache_id}")
        if lora.cid is not None:
            return root_key(f"cid:{lora.cid}")
        known = self._digest_roots.get(lora.name)
        if known is None or known[0]() is not lora:
            known = (weakref.ref(lora), root_key(f"sha256:{adapter_digest(lora)}"))
            self._digest_roots[lora.name] = known
        return known[1]

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.lora_pool.release(seq.lora_slot)
            seq.lora_slot = -1

    def _loop(self) -> None:
        # CPU: as many threads as other processes leave CPUs to us (node/engine/cpu_share.py)
        share = CpuShare(self.max_threads) if self.model.device.type == "cpu" else None
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._inbox and not self._aborts and not self.scheduler.has_work():
                        self._cond.wait()
                    if self._stop:
                        break
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, set()
                for seq in inbox:
                    seq.prefix_root = self._prefix_root(seq.lora)
                    self._seqs[seq.request_id] = seq
                    self.scheduler.add(seq)
                for request_id in aborts:
                    seq = self._seqs.get(request_id)
                    if seq is not None:
                        self._finish(seq, FinishReason.ABORT, "")
                if share is not None:
                    self._fit_threads(share)
                if not self.step():
                    with self._cond:  # nothing runnable (e.g. adapters loading): wait for a change
                        if not self._inbox and not self._aborts and not self._stop:
                            self._cond.wait(timeout=0.05)
        except BaseException as exc:  # noqa: BLE001 - surfaced to every waiting request
            log.exception("engine thread died")
            with self._cond:
                self.error = exc  # from now on submit() refuses
        finally:
            torch.set_num_threads(self.max_threads)  # what others in the process get while the engine is stopped
        self._abort_everything()

    def _fit_threads(self, share: CpuShare) -> None:
        threads = share.threads()
        if threads != torch.get_num_threads():
            log.info("computing with %d of %d threads: other processes took %.1f of %d CPUs",
                     threads, share.max_threads, share.others, len(share.cpus))  # fmt: skip
            torch.set_num_threads(threads)
        self.threads = threads

    def _abort_everything(self) -> None:
        """End every request still waiting for output (the thread stopped or died), so that no
        caller waits forever; submit() refuses new ones from here on."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        pending = inbox + list(self._seqs.values())
        self._seqs.clear()
        for seq in pending:
            out = GenerationOutput(seq.request_id, [], "", seq.num_prompt, seq.num_generated, FinishReason.ABORT)
            try:
                seq.callback(out)
            except Exception:  # noqa: BLE001 - one broken consumer must not keep the others waiting
                log.exception("could not notify request %s", seq.request_id)

    def step(self) -> bool:
        """Run one batch; False if nothing was runnable."""
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return False
        batch = build_batch(
            [w for _, w in scheduled.decodes], [w for _, w in scheduled.prefills], self.kv.block_size, self.model.device
        )
        self.before_forward(batch)
        logits = self.model.forward(batch, self.kv.k, self.kv.v)
        self.scheduler.complete(scheduled)
        sampling_seqs = scheduled.sampling_seqs()
        new_tokens = sample(
            logits.cpu(), [s.request.sampling for s in sampling_seqs], [s.generator for s in sampling_seqs]
        )
        self.steps += 1
        for seq, token in zip(sampling_seqs, new_tokens):
            self._append(seq, token)
        return True

    def before_forward(self, batch: StepBatch) -> None:
        if self.lora_pool is not None:
            self.lora_pool.prepare(batch)

    def _append(self, seq: Sequence, token: int) -> None:
        sp = seq.request.sampling
        seq.tokens.append(token)
        self.generated_tokens += 1
        is_eos = token in self.eos_token_ids and not sp.ignore_eos
        text, hit_stop = seq.detok.push([] if is_eos else [token])
        if is_eos or hit_stop:
            self._finish(seq, FinishReason.STOP, text, [token])
        elif seq.num_generated >= sp.max_tokens:
            self._finish(seq, FinishReason.LENGTH, text + seq.detok.flush(), [token])
        else:
            self._emit(seq, [token], text, None)

    def _finish(self, seq: Sequence, reason: FinishReason, text: str, tokens: list[int] | None = None) -> None:
        self.scheduler.finish(seq, reason)
        self._emit(seq, tokens or [], text, reason)
        self._seqs.pop(seq.request_id, None)

    def _emit(self, seq: Sequence, tokens: list[int], text: str, reason: FinishReason | None) -> None:
        seq.callback(
            GenerationOutput(
                request_id=seq.request_id,
                token_ids=tokens,
                text=text,
                prompt_tokens=seq.num_prompt,
                completion_tokens=seq.num_generated,
                finish_reason=reason,
            )
        )


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
