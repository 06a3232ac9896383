"""Multi-LoRA kernel benchmark and correctness check. Run from the repo root with PYTHONPATH=.

    scripts/bench_kernels.py                # CPU: the torch path's overhead over the base projections
    scripts/bench_kernels.py --check        # Triton vs reference (CUDA: bf16 at Llama-2-7B sizes;
                                            #   CPU: TRITON_INTERPRET at toy sizes); exit 1 on a mismatch
    scripts/bench_kernels.py --triton       # Triton vs the baselines: GB/s against a measured copy,
                                            #   time against a Python loop over adapters and gather+bmm
    --quick: a smaller grid. --model tiny|smollm2|llama2-7b overrides the shapes. --out DIR: also
    write the table there. The last line is always `RESULT key=value ...`.

Needs only torch (and triton for --check/--triton): no pytest, no package index. On a machine
without CUDA, --check and --triton run the kernels in Triton's interpreter (slow: toy shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before kernels imports a @triton.jit function
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
import kernels.cpu  # noqa: E402
from kernels import reference  # noqa: E402
from node.config import Settings  # noqa: E402

# (name, H_in, slice output sizes) per projection group, fused as the engine fuses them
MODELS = {
    "tiny": [("qkv", 40, (24, 8, 8)), ("o", 24, (40,)), ("gate_up", 40, (56, 56)), ("down", 56, (40,))],
    "smollm2": [
        ("qkv", 576, (576, 192, 192)),
        ("o", 576, (576,)),
        ("gate_up", 576, (1536, 1536)),
        ("down", 1536, (576,)),
    ],
    "llama2-7b": [
        ("qkv", 4096, (4096,) * 3),
        ("o", 4096, (4096,)),
        ("gate_up", 4096, (11008,) * 2),
        ("down", 11008, (4096,)),
    ],
}
NUM_LAYERS = {"tiny": 2, "smollm2": 30, "llama2-7b": 32}
NUM_SLOTS = 64
NATIVE = kernels.BACKENDS["native"]


@dataclass
class Group:
    """One projection group of one layer: base weight, stacked adapters, activations."""

    name: str
    W: torch.Tensor  # [N, H] fused base weight
    A: torch.Tensor  # [S, n, R, H]
    B: torch.Tensor  # [S, N, R]
    offsets: tuple[int, ...]
    x: torch.Tensor  # [T, H]
    y: torch.Tensor  # [T, N]
    native: kernels.cpu.LoraWeights | None = None  # the CPU engine's path (B stored [S, R, N])


@dataclass
class Step:
    """A batch: the token-to-slot map, its metadata, the pool's per-slot rank and scale."""

    label: str
    slots: torch.Tensor  # [T] int64 on the device
    meta: kernels.LoraMeta
    ranks: torch.Tensor  # [S] int32
    scales: torch.Tensor  # [S] fp32
    groups: list[Group]
    by_adapter: list[tuple[int, torch.Tensor]]  # (slot, token indices): the loop baseline's grouping
    lora_tokens: torch.Tensor  # [L] tokens with a slot (gather baseline)
    segments: kernels.cpu.LoraSegments | None = None


_LAYERS: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]]] = {}


def make_layer(model: str, rank: int, pool_rank: int, dtype: torch.dtype, device: torch.device):
    """One layer's base weights and a full pool of adapters (made on the device, cached)."""
    key = (model, rank, pool_rank, dtype, device)
    if key not in _LAYERS:
        _LAYERS.clear()  # one layer at a time: Llama-2-7B's pool at R=64 is ~1 GB
        g = torch.Generator(device=device).manual_seed(0)
        layer = []
        for name, H, sizes in MODELS[model]:
            N, n = sum(sizes), len(sizes)
            offsets = tuple(int(v) for v in torch.tensor((0,) + sizes).cumsum(0))
            W = torch.randn(N, H, generator=g, device=device, dtype=dtype) / H**0.5
            A = torch.zeros(NUM_SLOTS, n, pool_rank, H, device=device, dtype=dtype)
            A[:, :, :rank] = torch.randn(NUM_SLOTS, n, rank, H, generator=g, device=device, dtype=dtype) / H**0.5
            B = torch.zeros(NUM_SLOTS, N, pool_rank, device=device, dtype=dtype)
            B[:, :, :rank] = torch.randn(NUM_SLOTS, N, rank, generator=g, device=device, dtype=dtype) / rank**0.5
            layer.append((name, W, A, B, offsets))
        _LAYERS[key] = layer
    return _LAYERS[key]


def make_step(label, model, seq_lens, num_adapters, rank, pool_rank, dtype, device, seed=0, dense=False) -> Step:
    """Sequences of `seq_lens` tokens (1 = a decode token), spread over `num_adapters` adapters
    drawn at random from the pool (their slots scattered, as in a long-running pool), or in
    slots 0..num_adapters-1 when `dense` (a pool that keeps its active adapters together)."""
    g = torch.Generator().manual_seed(seed)
    adapters = torch.arange(num_adapters) if dense else torch.randperm(NUM_SLOTS, generator=g)[:num_adapters]
    slots = torch.cat([torch.full((n,), int(adapters[i % num_adapters])) for i, n in enumerate(seq_lens)])
    T = slots.numel()
    groups = [
        Group(
            name=name,
            W=W,
            A=A,
            B=B,
            offsets=offsets,
            x=torch.randn(T, W.shape[1], generator=g).to(device, dtype),
            y=torch.randn(T, W.shape[0], generator=g).to(device, dtype),
        )
        for name, W, A, B, offsets in make_layer(model, rank, pool_rank, dtype, device)
    ]
    slots_d = slots.to(device)
    scales = torch.full((NUM_SLOTS,), 2.0, device=device)
    ranks = torch.full((NUM_SLOTS,), rank, dtype=torch.int32, device=device)
    if device.type == "cpu" and dtype in kernels.cpu.DTYPES and kernels.cpu.available():
        for g in groups:
            B_engine = g.B.transpose(1, 2).contiguous().transpose(1, 2)  # the engine's storage order
            g.native = NATIVE.pack(g.A, B_engine, scales, ranks, g.offsets)
    meta = kernels.build_lora_meta(slots_d)
    return Step(
        label=label,
        slots=slots_d,
        meta=meta,
        ranks=ranks,
        scales=scales,
        groups=groups,
        segments=NATIVE.segments(meta) if groups[0].native is not None else None,
        by_adapter=[(int(s), (slots == s).nonzero().squeeze(1).to(device)) for s in slots.unique()],
        lora_tokens=torch.arange(T, device=device),
    )


# ---- the ways to apply a step's LoRA to one layer -------------------------------------------------


def run_base(step: Step) -> None:
    for g in step.groups:
        F.linear(g.x, g.W)


def run_kernels(step: Step, backend: str) -> None:
    for g in step.groups:
        kernels.add_lora(g.y, g.x, g.A, g.B, step.scales, step.ranks, g.offsets, step.meta, backend=backend)


def run_native(step: Step) -> None:
    """The CPU engine's path: the C kernel, weights and segments packed beforehand."""
    for g in step.groups:
        NATIVE.apply(g.y, g.x, g.native, step.segments)


def run_shrinks(step: Step) -> None:
    for g in step.groups:
        kernels.lora_shrink(g.x, g.A, step.meta, step.ranks)


def run_loop(step: Step) -> None:
    """Baseline: a Python loop over the step's adapters, one matmul pair per adapter and slice."""
    rank = step.ranks.tolist()
    for g in step.groups:
        for s, idx in step.by_adapter:
            r = rank[s]
            xs = g.x.index_select(0, idx)
            t = torch.matmul(xs, g.A[s, :, :r].transpose(1, 2))  # [n, c, r]
            d = torch.cat([t[i] @ g.B[s, lo:hi, :r].T for i, (lo, hi) in enumerate(zip(g.offsets, g.offsets[1:]))], 1)
            g.y.index_add_(0, idx, d, alpha=2.0)


def run_gather(step: Step) -> None:
    """Baseline: gather every token's A and B, then batched matmuls (one per slice for B)."""
    tok = step.lora_tokens
    slot = step.slots.index_select(0, tok)
    scale = step.scales.index_select(0, slot).to(step.groups[0].x.dtype).view(-1, 1, 1)
    for g in step.groups:
        L, (_, n, R, H) = tok.numel(), g.A.shape
        t = torch.bmm(g.A.index_select(0, slot).view(L, n * R, H), g.x.index_select(0, tok).unsqueeze(2))
        t = t.view(L, n, R) * scale.view(L, 1, 1)
        Bg = g.B.index_select(0, slot)  # [L, N, R]
        d = torch.cat(
            [
                torch.bmm(Bg[:, lo:hi], t[:, i].unsqueeze(2)).squeeze(2)
                for i, (lo, hi) in enumerate(zip(g.offsets, g.offsets[1:]))
            ],
            1,
        )
        g.y.index_add_(0, tok, d)


def gather_bytes(step: Step) -> int:
    """Bytes the gather baseline materialises per layer (it is skipped when too large)."""
    L = step.lora_tokens.numel()
    return sum(L * (g.A[0].numel() + g.B[0].numel()) * g.A.element_size() for g in step.groups)


def ideal_bytes(step: Step, rank: int) -> int:
    """Minimum traffic of one layer's LoRA: each used adapter's A and B (up to its rank) once,
    x read, y read and written, t written and read (fp32)."""
    used, L = len(step.by_adapter), step.meta.num_lora_tokens
    total = 0
    for g in step.groups:
        (_, n, R, H), N, e = g.A.shape, g.y.shape[1], g.x.element_size()
        total += used * (n * rank * H + N * rank) * e + L * (H + 2 * N) * e + 2 * L * n * R * 4
    return total


# ---- timing --------------------------------------------------------------------------------------


class Timer:
    """Times functions, interleaved rep by rep so that load from other processes hits them alike,
    with the caches flushed before each call: adapter weights come from memory, as in a real step
    (and no function finds the weights its predecessor left in cache). CUDA: events. CPU: wall clock."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        self.flush = torch.empty((256 if device.type == "cuda" else 64) << 20, dtype=torch.uint8, device=device)

    def many(self, fns: list) -> list[list[float]]:
        """Seconds per call: one list of `reps` samples per function."""
        for fn in fns:  # warm-up: compile, allocator, caches
            fn()
            fn()
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(self.reps):
            for fn, out in zip(fns, samples):
                out.append(self._once(fn))
        return samples

    def __call__(self, fn) -> float:
        return statistics.median(self.many([fn])[0])

    def _once(self, fn) -> float:
        self.flush.zero_()
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def ratio(samples: list[float], base: list[float]) -> float:
    """Median of the per-rep ratios: robust to load that comes and goes between reps."""
    return statistics.median(a / b for a, b in zip(samples, base))


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth, bytes/s (read + write)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = Timer(device, 10)(lambda: dst.copy_(src))
    return 2 * n / seconds


# ---- modes ---------------------------------------------------------------------------------------


def cpu_scenarios(quick: bool) -> list[tuple[str, str, list[int], int, bool]]:
    """(kind, label, sequence lengths, adapters, dense slots); the first decode row is the headline."""
    decode = [(32, 32, False), (1, 1, False), (8, 8, False), (32, 32, True), (64, 8, False), (64, 64, True)]
    prefill = [(1, 512), (4, 256), (4, 1024)]
    if quick:
        decode, prefill = [(32, 32, False), (1, 1, False)], [(4, 64)]
    return [
        ("decode", f"T={t:<3} adapters={u:<3}{' dense slots' if dense else ''}", [1] * t, u, dense)
        for t, u, dense in decode
    ] + [("prefill", f"{n}x{s} tokens, {n} adapters", [s] * n, n, False) for n, s in prefill]


def bench_cpu(args) -> None:
    """The CPU paths (the native C kernel the engine runs, and the torch reference) against the
    base projections and both baselines."""
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype or "float32")
    model = args.model or "smollm2"
    timer = Timer(device, 5 if args.quick else 30)
    rank = 16
    native = dtype in kernels.cpu.DTYPES and kernels.cpu.available()
    lines = args.report
    lines += [
        f"CPU, {torch.get_num_threads()} threads, {model} shapes (4 groups: qkv, o, gate_up, down), {dtype}, rank {rank}",
        "LoRA time as % of the layer's base projections (lower is better); native: the engine's CPU path",
        f"{'kind':8} {'batch':34} {'base ms':>8} {'native':>7} {'torch ref':>9} {'gather+bmm':>11} {'loop':>7}",
    ]
    if not native:
        lines.append(f"(native kernel unavailable: {kernels.cpu.unavailable_reason()}; the engine uses the torch path)")
    results: dict[str, list[float]] = {"decode": [], "prefill": []}
    for kind, label, seq_lens, adapters, dense in cpu_scenarios(args.quick):
        step = make_step(label, model, seq_lens, adapters, rank, rank, dtype, device, dense=dense)
        fns = [partial(run_base, step), partial(run_kernels, step, "reference"), partial(run_loop, step)]
        if native:
            fns.append(partial(run_native, step))
        if gather_bytes(step) < (1 << 30):
            fns.append(partial(run_gather, step))
        base, ref, loop, *rest = timer.many(fns)
        nat = rest.pop(0) if native else None
        gather = rest[0] if rest else None
        ours = nat if native else ref
        results[kind].append(ratio(ours, base))
        cells = [
            f"{ratio(nat, base):7.0%}" if native else f"{'-':>7}",
            f"{ratio(ref, base):9.0%}",
            f"{ratio(gather, base):11.0%}" if gather else f"{'-':>11}",
            f"{ratio(loop, base):7.0%}",
        ]
        lines.append(f"{kind:8} {label:34} {statistics.median(base) * 1e3:8.3f} " + " ".join(cells))
    # the headline numbers (the engine's path): decode of 32 tokens on 32 scattered adapters, and the largest prefill
    lines.append(
        f"RESULT cpu_lora_overhead_decode={results['decode'][0]:.3f} cpu_lora_overhead_prefill={results['prefill'][-1]:.3f}"
    )


def triton_scenarios(quick: bool, interpreted: bool) -> list[tuple[str, list[int], int, int, int]]:
    """(label, sequence lengths, adapters, rank, pool rank)."""
    if interpreted:  # a smoke run of this code path: the interpreter takes seconds per launch
        return [
            ("decode T=3 adapters=2 r=16", [1, 1, 1], 2, 16, 16),
            ("prefill 2x20 adapters=2 r=8", [20, 20], 2, 8, 16),
        ]
    out = []
    for rank in (16,) if quick else (8, 16, 64):
        for t, u in ((1, 1), (64, 64)) if quick else ((1, 1), (16, 16), (64, 1), (64, 16), (64, 64)):
            out.append((f"decode T={t} adapters={u} r={rank}", [1] * t, u, rank, rank))
        for n, s in ((4, 256),) if quick else ((4, 1024), (16, 256)):
            out.append((f"prefill {n}x{s} adapters={n} r={rank}", [s] * n, n, rank, rank))
    out.append(("decode T=64 adapters=64 r=16, R=64 pool", [1] * 64, 64, 16, 64))
    return out


def bench_triton(args) -> None:
    """Triton kernels vs the two baselines at real shapes (CUDA) or toy shapes (interpreter)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        force_triton()  # the interpreter: timings are meaningless
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    model = args.model or ("llama2-7b" if cuda else "tiny")
    timer = Timer(device, 1 if not cuda else 5 if args.quick else 20)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter (timings meaningless)"
    lines = args.report
    lines += [
        f"{name}, {model}, {dtype}, one layer = 4 projection groups (7 projections); "
        f"device-to-device copy {bw / 1e9:.0f} GB/s; GB/s = minimum bytes / LoRA time",
        f"{'batch':40} {'base ms':>8} {'lora ms':>8} {'shrink':>7} {'expand':>7} {'GB/s':>6} {'%copy':>6} "
        f"{'loop ms':>8} {'gather ms':>9} {'lora/base':>9}",
    ]
    headline: dict[str, float] = {}
    for label, seq_lens, adapters, rank, pool_rank in triton_scenarios(args.quick, not cuda):
        try:
            step = make_step(label, model, seq_lens, adapters, rank, pool_rank, dtype, device)
            fns = [
                partial(run_base, step),
                partial(run_kernels, step, "triton"),
                partial(run_shrinks, step),
                partial(run_loop, step),
            ]
            if gather_bytes(step) < (4 << 30):
                fns.append(partial(run_gather, step))
            base, ours, shrinks, loop, *gather = (statistics.median(v) for v in timer.many(fns))
            gather_s = gather[0] if gather else float("nan")
            gbs = ideal_bytes(step, rank) / ours
            lines.append(
                f"{label:40} {base * 1e3:8.3f} {ours * 1e3:8.3f} {shrinks * 1e3:7.3f} {(ours - shrinks) * 1e3:7.3f} "
                f"{gbs / 1e9:6.0f} {gbs / bw:6.0%} {loop * 1e3:8.3f} {gather_s * 1e3:9.3f} {ours / base:9.0%}"
            )
            if label == "decode T=64 adapters=64 r=16":
                layers = NUM_LAYERS[model]
                headline = {
                    "decode64x64_r16_step_ms": ours * layers * 1e3,
                    "limit_ms": ideal_bytes(step, rank) * layers / bw * 1e3,
                    "step_gb": ideal_bytes(step, rank) * layers / 1e9,
                    "speedup_vs_loop": loop / ours,
                    "speedup_vs_gather": gather_s / ours,
                }
        except Exception as e:  # keep going: this runs blind on a rented device
            lines.append(f"{label:40} ERROR {type(e).__name__}: {str(e)[:200]}")
        finally:
            if cuda:
                torch.cuda.empty_cache()
    if headline:
        lines.append(
            f"decode step, batch 64, 64 distinct rank-16 adapters, all 7 projections x {NUM_LAYERS[model]} layers: "
            f"{headline['decode64x64_r16_step_ms']:.2f} ms moving {headline['step_gb']:.2f} GB; "
            f"at the measured copy bandwidth that takes {headline['limit_ms']:.2f} ms"
        )
    lines.append("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in headline.items()) + f" copy_gbs={bw / 1e9:.0f}")


def check_cases(model: str) -> list[tuple[str, list[int], int, int, int, list[int] | None]]:
    """(label, sequence lengths, adapters, rank, pool rank, mixed ranks or None)."""
    return [
        ("one decode token", [1], 1, 16, 16, None),
        ("decode 64 tokens, 64 adapters", [1] * 64, 64, 16, 16, None),
        ("decode 64 tokens, 5 adapters", [1] * 64, 5, 8, 8, None),
        ("prefill 3 chunks + 6 decode, mixed ranks", [300, 1, 1, 1, 77, 1, 1, 1, 129], 9, 64, 64, [8, 16, 64]),
        ("prefill 1 chunk, one adapter", [1000 if model != "tiny" else 40], 1, 64, 64, None),
    ]


def run_check(args) -> bool:
    """Triton kernels against the torch reference (both on the same device), per dtype."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = args.model or ("llama2-7b" if cuda else "tiny")
    force_triton()
    if not kernels.triton_available():
        args.report.append("FAIL triton does not import")
        return False
    from kernels import expand, shrink

    # bf16 keeps 8 significant bits, and the reference rounds t to bf16 where the kernel keeps fp32
    tolerances = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
    dtypes = [torch.bfloat16] if args.quick else list(tolerances)
    lines, ok = args.report, True
    lines.append(f"check on {device}, {model} shapes: Triton vs torch reference, max error / max |value|")
    for dtype in dtypes:
        tol = tolerances[dtype]
        for label, seq_lens, adapters, rank, pool_rank, mixed in check_cases(model):
            try:
                step = make_step(label, model, seq_lens, adapters, rank, pool_rank, dtype, device, seed=1)
                if mixed:
                    step.ranks = torch.tensor(
                        [mixed[s % len(mixed)] for s in range(NUM_SLOTS)], dtype=torch.int32, device=device
                    )
                worst = 0.0
                for g in step.groups:
                    t_ref = reference.lora_shrink(g.x, g.A, step.meta, step.ranks)
                    t = shrink.lora_shrink(g.x, g.A, step.meta, step.ranks)
                    y_ref, y = g.y.clone(), g.y.clone()
                    reference.lora_expand(y_ref, t_ref, g.B, step.meta, step.scales, step.ranks, g.offsets)
                    expand.lora_expand(y, t, g.B, step.meta, step.scales, step.ranks, g.offsets)
                    worst = max(worst, rel_err(t, t_ref), rel_err(y - g.y, y_ref - g.y))
                passed = worst <= tol
                detail = f"max rel err {worst:.2e} (tol {tol:.0e})"
            except Exception as e:  # report and go on: this runs blind on a rented device
                passed, detail = False, f"ERROR {type(e).__name__}: {str(e)[:200]}"
            ok &= passed
            lines.append(f"{'ok  ' if passed else 'FAIL'} {str(dtype):15} {label:44} {detail}")
        step = make_step("base only", model, [1] * 5, 1, 16, 16, dtype, device)
        g, meta = step.groups[0], kernels.build_lora_meta(torch.full((5,), -1, device=device))
        y = g.y.clone()
        kernels.add_lora(y, g.x, g.A, g.B, step.scales, step.ranks, g.offsets, meta)
        same = torch.equal(y, g.y)
        ok &= same
        lines.append(f"{'ok  ' if same else 'FAIL'} {str(dtype):15} base-only step leaves y untouched")
    return ok


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.float() - want.float()).abs().max().item() / scale


def force_triton() -> None:
    kernels.configure(dataclasses.replace(kernels.config.current(), force_triton=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="Triton vs reference correctness; exit 1 on a mismatch")
    p.add_argument("--triton", action="store_true", help="benchmark the Triton kernels against the baselines")
    p.add_argument("--quick", action="store_true", help="a smaller grid")
    p.add_argument("--model", choices=sorted(MODELS), help="shapes (default: smollm2 on CPU, llama2-7b on CUDA)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="benchmark dtype (default: float32 on CPU, the CPU engine's; bfloat16 on CUDA)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="also write the report to this directory")
    args = p.parse_args()
    kernels.configure(Settings().kernel_config())  # OPENLORA_KERNEL_CACHE, OPENLORA_KERNEL_CFLAGS, CC, ...
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    name = "check" if args.check else "bench_triton" if args.triton else "bench_cpu"
    args.report = Report(args.out / f"{name}.txt" if args.out else None)
    ok = True
    if args.check:
        ok = run_check(args)
        args.report.append(f"RESULT check={'pass' if ok else 'fail'}")
    elif args.triton:
        bench_triton(args)
    else:
        bench_cpu(args)
    return 0 if ok else 1


class Report(list):
    """The report's lines: each printed (and written to the file) as it comes, so a run cut
    short by a timeout still leaves everything it measured."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path = path
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def append(self, line: str) -> None:
        super().append(line)
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


if __name__ == "__main__":
    sys.exit(main())
