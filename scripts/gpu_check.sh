#!/usr/bin/env bash
# GPU check of the multi-LoRA kernels, in one call on a CUDA machine (< 8 minutes):
#   1. correctness: Triton vs the torch reference at Llama-2-7B sizes, bf16, fp16 and fp32
#   2. benchmark: Triton vs a Python loop over adapters and gather+bmm; GB/s against a measured
#      device-to-device copy; the batch-64 / 64-adapter decode step against its bandwidth limit
# Uses only what the machine has (python3 with torch and triton; no pip, no pytest); runs the
# code of this checkout. Full logs go to $OUT (default /tmp/gpu_check); the summary comes last.
#
#   OUT=/some/dir scripts/gpu_check.sh    # exit 0: all passed; 1: a check failed or the benchmark
#                                         # broke (see the summary); 2: no CUDA device
#   GPU_CHECK_QUICK=1  smaller grids (about half the time)
#   GPU_CHECK_ALLOW_CPU=1  on a machine without CUDA, run everything at toy sizes in Triton's
#                          interpreter (how tests/kernels/test_scripts.py keeps this script honest)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1

{
    date -u
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git log -1 --oneline 2> /dev/null || true
} > "$OUT/env.txt" 2>&1

quick=()
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>> "$OUT/env.txt"; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_check: no CUDA device here (see $OUT/env.txt); GPU_CHECK_ALLOW_CPU=1 runs the toy-size version" >&2
        exit 2
    fi
    quick=(--quick)
fi
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--quick)

# Time limits keep the whole run under 8 minutes; a run cut short still leaves its lines in $OUT.
timeout 200 "$PY" scripts/bench_kernels.py --check "${quick[@]}" --out "$OUT" > "$OUT/check.log" 2>&1
check_rc=$?
timeout 250 "$PY" scripts/bench_kernels.py --triton "${quick[@]}" --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?

status() {
    case $1 in
        0) echo ok ;;
        124) echo "TIMED OUT" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}
echo
echo "==================== gpu_check summary ($(head -1 "$OUT/env.txt")) ===================="
grep -h "^python" "$OUT/env.txt"
count() { grep -c "$1" "$2" 2> /dev/null || true; }
echo "-- correctness: $(status $check_rc); $(count '^ok ' "$OUT/check.log") ok, $(count '^FAIL' "$OUT/check.log") failed (full: $OUT/check.log)"
grep -h "^FAIL" "$OUT/check.log" 2> /dev/null
[ $check_rc -ne 0 ] && tail -5 "$OUT/check.log"
echo "-- benchmark: $(status $bench_rc) (full: $OUT/bench.log)"
if [ -s "$OUT/bench_triton.txt" ]; then cat "$OUT/bench_triton.txt"; else tail -20 "$OUT/bench.log"; fi
grep -h "^RESULT" "$OUT/check.log" 2> /dev/null
[ $check_rc -eq 0 ] && [ $bench_rc -eq 0 ]
exit $?
