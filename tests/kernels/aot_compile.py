"""Compile the Triton kernels ahead of time for an H100/H200 (sm_90) without a GPU.

Run as a script, in a process without TRITON_INTERPRET (test_compile.py does that): Triton lowers
each kernel variant through TTIR, TTGIR, LLVM IR and PTX to a cubin with the ptxas it ships, so
errors the interpreter cannot see (early returns, dot shapes, dtypes, constexpr plumbing) show up
on CPU. Prints `compiled <n>`.
"""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.expand import _expand_kernel
from kernels.shrink import _shrink_kernel
from kernels.tuning import kernel_config

INDEX = {name: "*i32" for name in ("sorted_ids_ptr", "slot_ids_ptr", "starts_ptr", "ranks_ptr", "slice_offsets_ptr")}


def compile_variant(fn, pointers: dict[str, str], constexprs: dict) -> None:
    signature = {name: pointers.get(name, INDEX.get(name, "i32")) for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    consts = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})


def main(full: bool) -> int:
    dtypes = ["bf16", "fp16", "fp32"] if full else ["bf16"]
    slices = [1, 2, 3] if full else [3]
    count = 0
    for dt, n, decode in itertools.product(dtypes, slices, [True, False]):
        precision = "ieee" if dt == "fp32" else "tf32"
        cfg = kernel_config("shrink", decode)
        for atomic in [True, False]:
            compile_variant(
                _shrink_kernel,
                {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "t_ptr": "*fp32"},
                dict(
                    N_SLICES=n,
                    BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_K=cfg["BLOCK_K"],
                    BLOCK_R=cfg["BLOCK_R"],
                    ATOMIC=atomic,
                    DOT_PRECISION=precision,
                    UPCAST=False,
                ),  # fmt: skip
            )
            count += 1
        cfg = kernel_config("expand", decode)
        compile_variant(
            _expand_kernel,
            {"y_ptr": f"*{dt}", "t_ptr": "*fp32", "b_ptr": f"*{dt}", "scales_ptr": "*fp32"},
            dict(
                N_SLICES=n,
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"],
                BLOCK_R=16 if decode else 64,
                DOT_PRECISION=precision,
            ),  # fmt: skip
        )
        count += 1
    print(f"compiled {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main(full="--full" in sys.argv))
