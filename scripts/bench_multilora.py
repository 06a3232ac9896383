"""Mixed-adapter serving: our engine against PEFT's batched multi-adapter generate, and against
our own engine on the base model only, in one process on the same requests.

16 random rank-8 adapters for SmolLM2 (q/k/v/o, non-zero B, fixed seeds); 32 chat requests, each
assigned an adapter round-robin, exactly 64 new tokens each (EOS ignored everywhere), greedy.
  (a) our engine, all requests at once (max_num_seqs 32, 16 LoRA slots)
  (b) PEFT, all adapters loaded, one batched generate(..., adapter_names=[...]) of 32 (left padded)
  (c) our engine, the same requests on the base model
Runs are interleaved and repeated; the table shows medians. Every system gets the machine to itself:
set-up and PEFT run in threads of their own that end with their work, and our engine is stopped
while PEFT runs, so that only one thread at a time has an OpenMP pool (node/threads.py: a second
pool slows both sides down, by 1.5-2x on the 2-core CI machine).

    .venv/bin/python scripts/bench_multilora.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import chat_prompts, left_pad, running, tokens_per_s
from peft import PeftModel
from transformers import AutoModelForCausalLM

from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine.async_engine import resolve_dtype
from node.engine.prepare import prepare_model
from node.serving import load_engine
from node.threads import run_in_fresh_thread


def run_peft(model, prompts, adapter_names, new_tokens: int, pad_id: int) -> float:
    ids, mask = left_pad(prompts, pad_id)
    maxp = ids.shape[1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=adapter_names,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    wall = time.perf_counter() - t0
    assert out.shape[1] == maxp + new_tokens
    return len(prompts) * new_tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens, under 3 minutes")
    ap.add_argument("--dtype", default="auto", help="both systems: auto (bf16 where native), float32, bfloat16")
    args = ap.parse_args()
    n_req, n_adapters, new_tokens, repeats = (16, 8, 32, 2) if args.quick else (32, 16, 64, 3)

    dtype = resolve_dtype(Settings(dtype=args.dtype))
    work = Path(tempfile.mkdtemp(prefix="bench-multilora-"))
    names = [f"bench-{i:02d}" for i in range(n_adapters)]

    def build_peft() -> PeftModel:
        base_dir = prepare_model(Settings())
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        for i, name in enumerate(names):
            make_random_adapter(base_dir, work / name, rank=8, alpha=16, seed=1000 + i, std=0.02, base_model=base)
        peft = PeftModel.from_pretrained(base.to(dtype), work / names[0], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(work / name, adapter_name=name)
        return peft.eval()

    peft = run_in_fresh_thread(build_peft)
    engine = load_engine(  # no prefix cache: the warm-up and every repeat send the same prompts
        Settings(
            adapters_dir=work, max_loras=n_adapters, max_lora_rank=8, max_num_seqs=n_req, host_adapters=n_adapters,
            dtype=args.dtype, prefix_caching=False,
        )
    )  # fmt: skip
    prompts = chat_prompts(engine.tokenizer, n_req)
    assigned = [names[i % n_adapters] for i in range(n_req)]
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0

    def peft_alone(p: list[list[int]], a: list[str], n: int) -> float:
        return run_in_fresh_thread(run_peft, peft, p, a, n, pad)

    async def bench():
        res: dict[str, list[float]] = {"ours": [], "peft": [], "base": []}
        peft_alone(prompts[:4], assigned[:4], 4)  # warm-up
        for i in range(repeats):
            async with running(engine):
                if i == 0:
                    await tokens_per_s(engine, prompts, assigned, 4)  # warm-up: loads every adapter once
                res["ours"].append(await tokens_per_s(engine, prompts, assigned, new_tokens))
                res["base"].append(await tokens_per_s(engine, prompts, [None] * n_req, new_tokens))
            res["peft"].append(peft_alone(prompts, assigned, new_tokens))
        return res

    res = asyncio.run(bench())
    med = {k: statistics.median(v) for k, v in res.items()}
    print(
        f"\n{n_req} chat requests x {new_tokens} new tokens, {n_adapters} rank-8 q/k/v/o adapters round-robin, "
        f"greedy, batch {n_req}, {dtype}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    print(f"{'system':<44}{'tokens/s':>10}{'vs (a)':>9}")
    rows = [
        ("(a) openlora engine, mixed adapters", med["ours"]),
        ("(b) PEFT generate(adapter_names=...)", med["peft"]),
        ("(c) openlora engine, base model only", med["base"]),
    ]
    for label, v in rows:
        print(f"{label:<44}{v:>10.1f}{v / med['ours']:>9.2f}")
    speedup = med["ours"] / med["peft"]
    overhead = 1 - med["ours"] / med["base"]
    print(f"RESULT speedup_vs_peft={speedup:.2f} lora_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
