"""The native CPU kernel: kernels.add_lora's semantics in C (csrc/lora_cpu.c), compiled on first
use and loaded with ctypes. `kernels.dispatch` picks it for CPU fp32/bf16 tensors where it builds.

    w = kernels.cpu.LoraWeights(A, B, scales, ranks, slice_offsets)  # once per layer and group,
    seg = kernels.cpu.LoraSegments(meta)                             # once per step,
    kernels.cpu.apply(y, x, w, seg)                                  # and per call only this

Why C and not torch ops: on a CPU every torch op of a layer pays its dispatch once the layer's
weights have flushed the caches (30-70 us measured inside a decode step), and any dense torch
formulation multiplies every token by every slot in use. The C kernel is one call per layer and
group that reads only the slots in use, up to their ranks (docs/kernels.md has the numbers).

The shared object is built with the system C compiler (`KernelConfig.cc`: the node's `$CC`, else
`gcc`, else `cc`) for this CPU (`-march=native`, plus `KernelConfig.cflags`) into
`KernelConfig.cache_dir` (default `~/.cache/openlora/kernels`), keyed by the source, the flags, the
compiler and the CPU, so a build happens once per machine (about a second). With AVX512-BF16 the
bf16 kernel multiplies bf16 pairs directly (vdpbf16ps); elsewhere the portable C, vectorized by the compiler, serves. Where
there is no compiler, or the build fails, `available()` is False and `unavailable_reason()`
says why; callers then use the torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kernels import config
from kernels.checks import check_per_slot, check_slice_offsets
from kernels.meta import LoraMeta

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc")
_SOURCES = ("lora_cpu.c", "lora_cpu_impl.h")
_FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=gnu11",
    "-Werror=implicit-function-declaration",
) + (("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())
_FUNCTIONS = {torch.bfloat16: "openlora_add_lora_bf16", torch.float32: "openlora_add_lora_f32"}
DTYPES = tuple(_FUNCTIONS)

_lock = threading.Lock()
_lib: dict[torch.dtype, ctypes._CFuncPtr] | None = None
_features: ctypes._CFuncPtr | None = None
_error: str | None = None
_built_for: config.KernelConfig | None = None  # the settings _lib or _error came from


def cache_dir() -> Path:
    return config.current().cache_dir or config.default_cache_dir()


def available() -> bool:
    """Whether the native kernel is (or can be) built and loaded here; builds it on first call."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the native kernel is not available (None when it is, or before the first `available()`)."""
    return _error


def features() -> frozenset[str]:
    """What the built kernel does on this CPU: "avx512-bf16" (the bf16 vector path) and "amx"
    (AMX tiles for segments of 32+ tokens, when B is stored along the columns and H % 32 == 0).
    Empty when the kernel is unavailable."""
    if _load() is None:
        return frozenset()
    bits = _features()
    return frozenset(name for bit, name in ((1, "avx512-bf16"), (2, "amx")) if bits & bit)


class _Weights(ctypes.Structure):
    _fields_ = (
        [("A", ctypes.c_void_p)] + [(f, ctypes.c_int64) for f in ("a_s", "a_i", "a_j")]
        + [("B", ctypes.c_void_p)] + [(f, ctypes.c_int64) for f in ("b_s", "b_c", "b_j")]
        + [("scales", ctypes.c_void_p), ("ranks", ctypes.c_void_p), ("offsets", ctypes.c_void_p)]
        + [(f, ctypes.c_int64) for f in ("S", "n", "H", "R")]
    )  # fmt: skip


class _Segments(ctypes.Structure):
    _fields_ = [(f, ctypes.c_void_p) for f in ("sorted_tokens", "seg_slots", "seg_starts")] + [
        ("nseg", ctypes.c_int64),
        ("nthreads", ctypes.c_int64),
    ]


class LoraWeights:
    """One layer and group's stacked A [S, n, R, H] and B [S, N, R] with the pool's scales and
    ranks, checked once and packed for the kernel; the tensors are kept alive (the kernel reads
    them in place, so later writes into them are seen)."""

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        scales: torch.Tensor,
        ranks: torch.Tensor,
        slice_offsets: tuple[int, ...],
    ):
        if _load() is None:
            raise RuntimeError(f"the native LoRA kernel is not available: {_error}")
        if A.dim() != 4:
            raise ValueError(f"A must be [S, n_slices, R, H_in], got {tuple(A.shape)}")
        S, n, R, H = A.shape
        if any(t.device.type != "cpu" for t in (A, B, scales, ranks)):
            raise TypeError("A, B, scales and ranks must be CPU tensors")
        if A.dtype not in _FUNCTIONS or B.dtype != A.dtype or A.stride(-1) != 1:
            raise TypeError(
                f"A and B must be CPU tensors of one of {DTYPES} with contiguous rows, got {A.dtype}, {B.dtype}"
            )
        if B.dim() != 3 or B.shape[0] != S or B.shape[2] != R:
            raise ValueError(f"B must be [S={S}, N, R={R}], got {tuple(B.shape)}")
        check_slice_offsets(slice_offsets, n, B.shape[1])
        check_per_slot(scales, S, "scales")
        check_per_slot(ranks, S, "ranks")
        if scales.dtype != torch.float32 or ranks.dtype != torch.int32:
            raise TypeError(f"scales must be float32 and ranks int32, got {scales.dtype} and {ranks.dtype}")
        if not (scales.is_contiguous() and ranks.is_contiguous()):
            raise ValueError("scales and ranks must be contiguous")
        self.dtype, self.S, self.n, self.H, self.N = A.dtype, S, n, H, slice_offsets[-1]
        self._keep = (A, B, scales, ranks, torch.tensor(slice_offsets, dtype=torch.int64))
        self.struct = _Weights(
            A.data_ptr(), *A.stride()[:3], B.data_ptr(), *B.stride(), scales.data_ptr(), ranks.data_ptr(),
            self._keep[-1].data_ptr(), S, n, H, R,
        )  # fmt: skip
        self.ref = ctypes.addressof(self.struct)
        self.fn = _load()[A.dtype]


class LoraSegments:
    """One step's segments (a LoraMeta on the CPU), packed for the kernel."""

    def __init__(self, meta: LoraMeta, threads: int | None = None):
        index = (meta.sorted_token_ids, meta.slot_ids, meta.starts)
        if any(t.device.type != "cpu" for t in index):
            raise ValueError("the native kernel needs the step's LoraMeta on the CPU")
        if any(t.dtype != torch.int32 or not t.is_contiguous() for t in index):
            raise TypeError("the LoraMeta's index tensors must be contiguous int32 (build_lora_meta's)")
        self.meta = meta
        self.has_lora = meta.has_lora
        self.struct = _Segments(
            meta.sorted_token_ids.data_ptr(), meta.slot_ids.data_ptr(), meta.starts.data_ptr(), meta.num_segments,
            threads or torch.get_num_threads(),
        )  # fmt: skip
        self.ref = ctypes.addressof(self.struct)


def apply(
    y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, segments: LoraSegments, *, check: bool = True
) -> None:
    """y += the LoRA update of x (add_lora's semantics) for prepacked weights and segments.

    The weights' and segments' own checks were done once when they were packed; y and x are
    checked here (dtype, device, shapes, row strides). check=False skips that, for a caller that
    guarantees CPU tensors of the weights' dtype with y [T, N] and x [T, H] contiguous: the
    engine's slot pool, where y comes from F.linear and x from the model (inside a decode step
    these attribute reads cost ~10 us a call, ~1% of the step).
    """
    if check:
        if y.dtype != weights.dtype or x.dtype != weights.dtype or y.device.type != "cpu" or x.device.type != "cpu":
            raise TypeError(f"y and x must be CPU {weights.dtype} tensors, got {y.dtype} and {x.dtype}")
        T = segments.meta.num_tokens
        if y.shape != (T, weights.N) or x.shape != (T, weights.H) or y.stride(-1) != 1 or x.stride(-1) != 1:
            raise ValueError(f"y must be [{T}, {weights.N}] and x [{T}, {weights.H}] with contiguous rows")
        if T > 1 and y.stride(0) < weights.N:
            raise ValueError(
                f"y's rows overlap (row stride {y.stride(0)} < {weights.N}): the kernel writes them in parallel"
            )
    if not segments.has_lora:
        return
    rc = weights.fn(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), weights.ref, segments.ref)
    if rc == -2:
        raise IndexError(f"a segment's slot is outside the {weights.S} slots of the weights")
    if rc != 0:
        raise MemoryError("the native LoRA kernel could not allocate its scratch memory")


def _load() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    global _lib, _error, _features, _built_for
    settings = config.current()
    if _built_for is settings:  # the common case: one identity check per call
        return _lib
    with _lock:
        if _built_for != settings:  # first use, or the settings changed (kernels.config.configure)
            _lib, _features, _error = _open()
        _built_for = settings
    return _lib


def _open() -> tuple[dict[torch.dtype, ctypes._CFuncPtr] | None, ctypes._CFuncPtr | None, str | None]:
    """(functions by dtype, the features function, None) of the built library, or (None, None, why not)."""
    try:
        lib = ctypes.CDLL(str(_build()))
        fns = {dtype: getattr(lib, name) for dtype, name in _FUNCTIONS.items()}
        features_fn = lib.openlora_kernel_features
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        log.warning("native CPU LoRA kernel unavailable (%s); using the torch path", e)
        return None, None, str(e)
    for fn in fns.values():
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
    features_fn.restype, features_fn.argtypes = ctypes.c_int, []
    return fns, features_fn, None


def _compiler() -> list[str]:
    """The configured compiler (the node's $CC, with its arguments), else gcc, else cc: GCC links the
    libgomp torch already loaded, where clang's -fopenmp would bring a second OpenMP runtime."""
    configured = config.current().cc
    if configured:
        cc = shlex.split(configured)
        if cc and shutil.which(cc[0]):
            return cc
        raise RuntimeError(f"CC={configured!r} is not an executable")
    for cc in ("gcc", "cc"):
        if shutil.which(cc):
            return [cc]
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def _build() -> Path:
    """The compiled shared object for this source, compiler and CPU; built if not cached."""
    cc = _compiler()
    flags = (*_FLAGS, *shlex.split(config.current().cflags))
    version = subprocess.run(
        [*cc, "--version"], capture_output=True, text=True, errors="replace", timeout=30
    ).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for name in _SOURCES:
        key.update((_SRC / name).read_bytes())
    key.update(repr((flags, cc, version, platform.machine(), _cpu_flags())).encode())
    target = cache_dir() / f"lora_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run(
            [*cc, *flags, f"-I{_SRC}", str(_SRC / "lora_cpu.c"), "-o", str(out)],
            capture_output=True, text=True, errors="replace", timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise RuntimeError(f"{cc[0]} failed to build the kernel (exit {proc.returncode}): {first}")
        os.replace(out, target)  # atomic: a concurrent build of the same key just wins or loses the race
    log.info("built the native CPU LoRA kernel: %s", target)
    return target


def _cpu_flags() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    seen: dict[str, str] = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
            seen[key] = line
    return "\n".join(seen.values())
