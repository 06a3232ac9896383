"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step holds one decode token of each running sequence plus prefill chunks, at most
`max_prefill_tokens` prompt tokens in all, shared: one sequence prefills at most a chunk of a
quarter of that per step, and while sequences wait, the running prefills leave one chunk of the
budget to them. So a long prompt is read a chunk per step, a short request that arrives meanwhile
is admitted at the next step and gets its first token about one chunk's time later (not after the
whole long prompt), and decodes keep flowing. Admission is first come, first served, bounded by
`max_num_seqs` and free KV blocks; a sequence starts from the cached blocks of its adapter's
longest cached prefix (node/engine/kv_cache.py) and prefills the rest. When a decode cannot get a new block, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the front of the queue,
to be recomputed from its tokens later.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.adapters.peft_format import LoraAdapter
from node.engine.batch import SeqWork
from node.engine.detokenizer import IncrementalDetokenizer
from node.engine.kv_cache import KVCache
from node.engine.prefix_cache import extend_keys
from node.engine.types import FinishReason, GenerationOutput, GenerationRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: GenerationRequest
    lora: LoraAdapter | None
    callback: Callable[[GenerationOutput], None]  # where its outputs go (called on the engine thread)
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_prompt: int = 0
    num_cached: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    lora_slot: int = -1
    finish_reason: FinishReason | None = None
    prefix_root: bytes | None = None  # start of its blocks' key chain; None: no prefix caching
    block_keys: list[bytes] = field(default_factory=list)  # keys of its full blocks, as far as computed
    num_keyed: int = 0  # blocks of its table that carry their key

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass
class ScheduledStep:
    decodes: list[tuple[Sequence, SeqWork]]
    prefills: list[tuple[Sequence, SeqWork]]

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    def sampling_seqs(self) -> list[Sequence]:
        """Sequences that sample a token this step, in the order of the batch's logit rows."""
        return [s for s, _ in self.decodes] + [s for s, w in self.prefills if w.needs_logits]


class Scheduler:
    def __init__(
        self,
        kv: KVCache,
        max_num_seqs: int,
        max_prefill_tokens: int,
        acquire: Callable[[Sequence], bool] = lambda seq: True,
        release: Callable[[Sequence], None] = lambda seq: None,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        # One sequence's prefill per step. A quarter of the budget: up to 4 prompts progress side by
        # side, and a chunk of SmolLM2 bf16 on 2 cores (512 tokens at the default 2048) is ~0.5 s.
        self.prefill_chunk = max(1, max_prefill_tokens // 4)
        # Resources beyond KV blocks that a running sequence holds (its adapter's LoRA slot).
        # acquire returns False when they are not available now: the sequence waits, others go on.
        self.acquire = acquire
        self.release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_hit_tokens = 0  # admitted tokens whose K/V came from the prefix cache
        self.prefix_miss_tokens = 0  # admitted tokens of prefix-cached sequences that had to be computed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self.kv.release(seq.block_table)
        if seq in self.running:
            self.release(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.kv.release(seq.block_table)
        self.release(seq)
        seq.num_cached = seq.num_keyed = 0
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(decodes=[], prefills=[])
        budget, chunk = self.max_prefill_tokens, self.prefill_chunk
        # running prefills leave a chunk to the waiting sequences when one of them can be admitted
        # (and the budget holds two chunks: a budget of 1 token would otherwise stall them)
        room = self.waiting and len(self.running) < self.max_num_seqs and budget >= 2 * chunk
        reserve = chunk if room else 0
        # 1. running sequences: a decode token each, or the next chunk of an unfinished prefill
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below by a sequence earlier in this loop
            pending = len(seq.tokens) - seq.num_cached
            if pending == 1:
                while not self.kv.grow(seq.block_table, len(seq.tokens)):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is SeqStatus.RUNNING:
                    step.decodes.append((seq, self._work(seq, len(seq.tokens))))
            elif budget > reserve:
                n = min(pending, chunk, budget - reserve)
                budget -= n
                step.prefills.append((seq, self._work(seq, seq.num_cached + n)))
        # drop work of sequences preempted after they were scheduled
        step.decodes = [(s, w) for s, w in step.decodes if s.status is SeqStatus.RUNNING]
        step.prefills = [(s, w) for s, w in step.prefills if s.status is SeqStatus.RUNNING]
        # 2. admit waiting sequences while slots, blocks and prefill budget last
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            cached = self._cached_prefix(seq)
            # all blocks for the current tokens up front, so its prefill can always finish
            if not self.kv.can_admit(cached, len(seq.tokens)):
                self.waiting.appendleft(seq)
                break
            if not self.acquire(seq):
                skipped.append(seq)  # e.g. every LoRA slot is pinned: it must not block the others
                continue
            self.kv.admit(seq.block_table, cached, len(seq.tokens))
            seq.num_cached = len(cached) * self.kv.block_size
            seq.num_keyed = len(cached)
            if seq.prefix_root is not None:
                self.prefix_hit_tokens += seq.num_cached
                self.prefix_miss_tokens += len(seq.tokens) - seq.num_cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.num_cached, chunk, budget)
            budget -= n
            step.prefills.append((seq, self._work(seq, seq.num_cached + n)))
        self.waiting.extendleft(reversed(skipped))
        return step

    def complete(self, step: ScheduledStep) -> None:
        """The step ran: its tokens' K/V are in the cache, and blocks it filled get their keys."""
        bs = self.kv.block_size
        for seq, work in step.decodes + step.prefills:
            seq.num_cached = work.end
            full = seq.num_cached // bs
            if seq.prefix_root is None or full <= seq.num_keyed:
                continue
            extend_keys(seq.block_keys, seq.prefix_root, seq.tokens, bs, full)
            for i in range(seq.num_keyed, full):
                self.kv.allocator.set_key(seq.block_table[i], seq.block_keys[i])
            seq.num_keyed = full

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if seq.prefix_root is None:
            return []
        bs, n = self.kv.block_size, len(seq.tokens)
        extend_keys(seq.block_keys, seq.prefix_root, seq.tokens, bs, (n - 1) // bs)
        return self.kv.cached_prefix(seq.block_keys, n)

    def _work(self, seq: Sequence, end: int) -> SeqWork:
        return SeqWork(
            tokens=seq.tokens,
            start=seq.num_cached,
            end=end,
            block_table=seq.block_table,
            needs_logits=end == len(seq.tokens),
            lora_slot=seq.lora_slot,
        )
