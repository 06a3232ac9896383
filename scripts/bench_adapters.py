"""Content-addressed adapters: verify speed, cold-start latency, and serving many adapters.

(a) verify throughput of a 64 MiB file's CAR (our streaming verifier, rebuilding the file) against
    hashlib.sha256 over the same bytes, same run (scripts/bench_ipfs_verify.py has the details)
(b) cold start of a SmolLM2 rank-8 adapter published beforehand and never fetched by this node:
    time to first token of its first request minus the time to first token of the same request
    once the adapter is warm = the added latency of fetch + verify + validate + load
(c) 200 distinct adapters requested round robin with fewer device slots (32, the batch size) than
    against the same run with 4 adapters: tokens/s ratio. Every adapter is published to the local
    IPFS node and fetched once before timing (disk and host tiers warm); the device slots churn.

  .venv/bin/python scripts/bench_adapters.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_ipfs_verify import measure_verify
from benchlib import tokens_per_s
from safetensors.torch import load_file, save_file

from node.adapters.ipfs import KuboRpcClient, LocalIpfsNode, import_directory
from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine import AsyncEngine, GenerationRequest, SamplingParams
from node.engine.prepare import prepare_model
from node.serving import load_engine
from node.threads import run_in_fresh_thread


def make_adapters(base_dir: Path, root: Path, n: int) -> list[Path]:
    """n distinct rank-8 q/k/v/o adapters: one written by PEFT, the rest with its layout and config
    and fresh random weights (PEFT itself would take ~0.5 s each)."""
    # in a thread of its own, like every torch job outside the engine thread (node/threads.py)
    template = run_in_fresh_thread(lambda: make_random_adapter(base_dir, root / "a000", rank=8, seed=0, std=0.02))
    tensors = load_file(template / "adapter_model.safetensors")
    out = [template]
    for i in range(1, n):
        d = root / f"a{i:03d}"
        d.mkdir()
        (d / "adapter_config.json").write_bytes((template / "adapter_config.json").read_bytes())
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in tensors.items()}, d / "adapter_model.safetensors"
        )
        out.append(d)
    return out


async def publish_all(api_url: str, dirs: list[Path]) -> list[str]:
    async with KuboRpcClient(api_url) as client:
        return [str(await client.publish(import_directory(d))) for d in dirs]


async def ttft(engine: AsyncEngine, prompt: list[int], model: str | None) -> float:
    t0 = time.perf_counter()
    req = GenerationRequest(f"t{t0}", prompt, SamplingParams(max_tokens=1, temperature=0), model)
    async for _ in engine.generate(req):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller workloads, same last line")
    args = ap.parse_args()
    verify_mib, cold_n, many, requests, new_tokens, repeats = (
        (16, 3, 40, 40, 8, 1) if args.quick else (64, 7, 200, 200, 16, 2)
    )

    verify = measure_verify(verify_mib, repeats=3 if args.quick else 5)

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    base_dir = prepare_model(Settings())
    dirs = make_adapters(base_dir, work / "src", many + cold_n)
    with LocalIpfsNode(work / "ipfs") as node:
        cids = asyncio.run(publish_all(node.api_url, dirs))
        cold_cids, many_cids = cids[:cold_n], cids[cold_n:]
        settings = Settings(
            model=str(base_dir), cache_dir=work / "cache", ipfs_gateways=[node.gateway_url], local_ipfs=False,
            max_loras=32, max_lora_rank=8, host_adapters=many + cold_n, max_num_seqs=32,
        )  # fmt: skip
        engine = load_engine(settings)
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            return_dict=False,
        )

        async def bench():
            await engine.start()
            try:
                await ttft(engine, prompt, None)  # warm-up
                extra = []
                for cid in cold_cids:  # (b): cold, then the same request warm
                    cold = await ttft(engine, prompt, cid)
                    warm = statistics.median([await ttft(engine, prompt, cid) for _ in range(3)])
                    extra.append((cold - warm) * 1000)
                    print(f"  cold start {cid[:16]}...: first {cold * 1000:.1f} ms, warm {warm * 1000:.1f} ms")
                # (c): fetch every adapter once (disk + host tiers warm), then time
                await asyncio.gather(*(ttft(engine, prompt, c) for c in many_cids))
                prompts = [prompt] * requests
                rr_many = [many_cids[i % many] for i in range(requests)]
                rr_four = [many_cids[i % 4] for i in range(requests)]
                t_many, t_four = [], []
                for _ in range(repeats):
                    t_many.append(await tokens_per_s(engine, prompts, rr_many, new_tokens))
                    t_four.append(await tokens_per_s(engine, prompts, rr_four, new_tokens))
                return extra, statistics.median(t_many), statistics.median(t_four), engine.runner.lora_pool.loads
            finally:
                await engine.stop()

        extra, tput_many, tput_four, slot_loads = asyncio.run(bench())

    cold_ms = statistics.median(extra)
    rows = [
        (f"(a) verify CAR of {verify_mib} MiB, MB/s (peer: sha256)", f"{verify['verify']:.0f}",
         f"{verify['sha256']:.0f}", f"{verify['ratio']:.2f}"),
        (f"(b) cold-start extra TTFT, ms, median of {cold_n} adapters", f"{cold_ms:.1f}", "", ""),
        (f"(c) tokens/s, {many} adapters / 32 slots (peer: 4 adapters)", f"{tput_many:.1f}", f"{tput_four:.1f}",
         f"{tput_many / tput_four:.2f}"),
    ]  # fmt: skip
    print(f"\n{'measure':<58}{'value':>12}{'peer':>12}{'ratio':>8}")
    for label, value, peer, ratio in rows:
        print(f"{label:<58}{value:>12}{peer:>12}{ratio:>8}")
    print(
        f"    {requests} requests x {new_tokens} tokens, batch 32, median of {repeats}; "
        f"device-slot loads over the run: {slot_loads}"
    )
    print(json.dumps({"verify": {k: round(v, 3) for k, v in verify.items()}}))
    print(
        f"RESULT verify_vs_sha256={verify['ratio']:.2f} cold_start_extra_ms={cold_ms:.1f} "
        f"many_adapters_ratio={tput_many / tput_four:.2f}"
    )


if __name__ == "__main__":
    main()
