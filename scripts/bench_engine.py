"""Our continuous-batching engine against transformers' batched `generate`, same workload, one process.

Workload (fixed seed): N requests with prompt lengths 16-256 and output lengths 8-128 tokens, greedy,
EOS ignored so every request produces exactly its length. Ours gets all requests at once with
max_num_seqs = N; transformers gets them as one left-padded batch of N and, being a static batch,
runs until the longest output is done (min_new_tokens forces the same lengths; only each request's
own tokens count as useful). Runs are interleaved and repeated; the table shows medians. Each
system has the machine to itself: transformers loads and runs in threads of their own that end
with their work, and our engine is stopped meanwhile (node/threads.py: two OpenMP pools in one
process slow both down).

Second table (ours only): time to first token of a short request alone, and sent while a long
prompt (6,000 tokens; 4,000 with --quick) is being prefilled (sent as soon as that one is admitted):
chunked prefill shares each step, so the short one should wait about a chunk, not the whole prompt.

    .venv/bin/python scripts/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from benchlib import left_pad, running, serve_all
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from node.config import Settings
from node.engine import AsyncEngine
from node.engine.async_engine import resolve_dtype
from node.engine.prepare import prepare_model
from node.threads import run_in_fresh_thread


def workload(n: int, max_prompt: int, max_out: int, seed: int = 0) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        plen = int(torch.randint(16, max_prompt + 1, (1,), generator=g))
        olen = int(torch.randint(8, max_out + 1, (1,), generator=g))
        reqs.append((torch.randint(100, 40000, (plen,), generator=g).tolist(), olen))
    return reqs


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


async def run_ours(engine: AsyncEngine, reqs) -> dict:
    prompts, lengths = [ids for ids, _ in reqs], [o for _, o in reqs]
    served, wall = await serve_all(engine, prompts, lengths, [None] * len(reqs))
    return {
        "tok_s": sum(s.tokens for s in served) / wall,
        "lat_mean": statistics.mean(s.done_s for s in served),
        "lat_p95": p95([s.done_s for s in served]),
        "ttft": statistics.mean(s.first_token_s for s in served),
    }


class _FirstStep(LogitsProcessor):
    """Records when generate produces its first token (after the batched prefill)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_hf(model, reqs, pad_id: int) -> dict:
    input_ids, mask = left_pad([ids for ids, _ in reqs], pad_id)
    maxp, maxo = input_ids.shape[1], max(o for _, o in reqs)
    first = _FirstStep()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=maxo,
            min_new_tokens=maxo,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([first]),
        )
    wall = time.perf_counter() - t0
    assert out.shape[1] == maxp + maxo
    useful = sum(o for _, o in reqs)
    return {"tok_s": useful / wall, "lat_mean": wall, "lat_p95": wall, "ttft": first.at - t0}


async def first_token_s(engine: AsyncEngine, ids: list[int]) -> float:
    """Seconds from submission to the first token of a greedy request for one token."""
    served, _ = await serve_all(engine, [ids], [1], [None])
    return served[0].first_token_s


async def ttft_behind_long(engine: AsyncEngine, short: list[int], long: list[int]) -> tuple[float, float]:
    """TTFT of `short` sent as soon as `long` is admitted (its prefill under way), and the long one's TTFT."""
    t0 = time.perf_counter()
    long_task = asyncio.create_task(first_token_s(engine, long))
    while engine.stats()["running"] == 0:
        await asyncio.sleep(0.001)
    behind = await first_token_s(engine, short)
    await long_task
    return behind, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller workload, under 2 minutes")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="both systems: auto (bf16 where native), float32, bfloat16")
    args = ap.parse_args()
    n, max_prompt, max_out = (12, 128, 48) if args.quick else (32, 256, 128)
    repeats = args.repeats or (2 if args.quick else 3)
    reqs = workload(n, max_prompt, max_out)

    # no prefix cache: every repeat (and the warm-up) sends the same prompts, which it would find
    settings = Settings(max_num_seqs=n, dtype=args.dtype, prefix_caching=False)
    path = prepare_model(settings)
    engine = AsyncEngine.load(settings)
    dtype = resolve_dtype(settings)
    hf = run_in_fresh_thread(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0

    g = torch.Generator().manual_seed(1)
    short = torch.randint(100, 40000, (8,), generator=g).tolist()
    long = torch.randint(100, 40000, (4000 if args.quick else 6000,), generator=g).tolist()

    async def bench():
        run_in_fresh_thread(run_hf, hf, reqs[:4], pad)  # warm-up
        ours, theirs, stall = [], [], []
        for i in range(repeats):  # interleaved: machine noise hits both alike
            async with running(engine):
                if i == 0:
                    await run_ours(engine, reqs[:4])  # warm-up
                ours.append(await run_ours(engine, reqs))
                alone = await first_token_s(engine, short)
                behind, long_s = await ttft_behind_long(engine, short, long)
                stall.append({"alone": alone, "behind": behind, "long": long_s})
            theirs.append(run_in_fresh_thread(run_hf, hf, reqs, pad))
        return ours, theirs, stall

    ours, theirs, stall = asyncio.run(bench())
    med = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in (("ours", ours), ("hf", theirs))
    }
    print(
        f"\nworkload: {n} requests, prompts 16-{max_prompt}, outputs 8-{max_out} tokens, greedy, "
        f"batch {n}, {dtype}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    print(f"{'system':<34}{'tokens/s':>10}{'mean lat s':>12}{'p95 lat s':>11}{'TTFT s':>9}")
    for label, key in (("openlora engine (continuous)", "ours"), ("transformers generate (static)", "hf")):
        m = med[key]
        print(f"{label:<34}{m['tok_s']:>10.1f}{m['lat_mean']:>12.2f}{m['lat_p95']:>11.2f}{m['ttft']:>9.2f}")
    ratio = med["ours"]["tok_s"] / med["hf"]["tok_s"]
    print(f"{'ratio ours/transformers':<34}{ratio:>10.2f}")
    st = {k: statistics.median(r[k] for r in stall) for k in stall[0]}
    chunk = engine.runner.scheduler.prefill_chunk
    print(
        f"\nshort request ({len(short)} tokens, 1 new) sent while a {len(long)}-token prompt prefills "
        f"(prefill chunk {chunk} tokens), median of {repeats}"
    )
    print(f"{'TTFT short alone s':<34}{'behind long s':>14}{'ratio':>8}{'long prompt TTFT s':>20}")
    print(f"{st['alone']:<34.2f}{st['behind']:>14.2f}{st['behind'] / st['alone']:>8.1f}{st['long']:>20.2f}")
    print(f"RESULT engine_vs_hf_generate={ratio:.2f}")


if __name__ == "__main__":
    main()
