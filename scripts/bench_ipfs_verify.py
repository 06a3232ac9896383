"""How fast is verifying a fetched adapter, next to just hashing its bytes?

A file of random bytes is imported with our UnixFS importer and written as a CAR; each repeat then
(interleaved, so that machine noise hits every row alike) hashes the bytes once with
`hashlib.sha256`, and reads the CAR back through the streaming verifier, which checks every
block's hash and rebuilds the file in a temp dir (`verify`; `verify+fsync` also makes it durable,
as `fetch_verified` does by default). Medians are reported; the last line is machine-readable:

    RESULT verify_vs_sha256=<verify MB/s / sha256 MB/s>     (target: >= 0.5)

Usage: .venv/bin/python scripts/bench_ipfs_verify.py [--quick] [--size-mib N] [--repeats N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from node.adapters.ipfs import import_file, verify_car_file

MB = 1_000_000


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: user + system, so writes into the page cache count)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_verify(size_mib: int = 64, repeats: int = 5) -> dict[str, float]:
    """Median throughputs in MB/s of `sha256`, `verify`, `verify_fsync` and `import`, from wall
    time, and the same from CPU time (`*_cpu`: steadier when other jobs share the cores);
    `ratio` = verify / sha256 (wall), `ratio_cpu` the same from CPU time. Size: `size_mib` MiB."""
    size = size_mib * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="bench-ipfs-"))
    try:
        data = os.urandom(size)
        (work / "adapter.bin").write_bytes(data)
        car = work / "adapter.car"
        times: dict[str, list[tuple[float, float]]] = {"sha256": [], "verify": [], "verify_fsync": [], "import": []}
        for i in range(repeats):
            times["sha256"].append(_timed(lambda: hashlib.sha256(data).digest()))
            times["import"].append(_timed(lambda: import_file(work / "adapter.bin").write_car(car)))
            dag = import_file(work / "adapter.bin")
            for name, durable in (("verify", False), ("verify_fsync", True)):
                out = work / f"out-{name}-{i}"
                verify = partial(verify_car_file, car, dag.root, out, max_bytes=2 * size, durable=durable)
                times[name].append(_timed(verify))
                if out.read_bytes() != data:
                    raise AssertionError("the verifier rebuilt different bytes")
                out.unlink()
        result: dict[str, float] = {}
        for name, ts in times.items():
            result[name] = size / statistics.median(t[0] for t in ts) / MB
            result[f"{name}_cpu"] = size / statistics.median(t[1] for t in ts) / MB
        result["ratio"] = result["verify"] / result["sha256"]
        result["ratio_cpu"] = result["verify_cpu"] / result["sha256_cpu"]
        result["size_mib"] = size_mib
        result["repeats"] = repeats
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB, 3 repeats")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    size, repeats = (16, 3) if args.quick else (args.size_mib, args.repeats)
    r = measure_verify(size, repeats)
    table = Table(title=f"CAR verification of a {size} MiB file (median of {repeats}, MB = 10^6 bytes)")
    table.add_column("what")
    table.add_column("MB/s", justify="right")
    table.add_column("vs sha256", justify="right")
    table.add_column("MB/s (CPU time)", justify="right")
    table.add_column("vs sha256 (CPU)", justify="right")
    rows = [
        ("hashlib.sha256 over the bytes in memory", "sha256"),
        ("verify: read CAR, check every block, rebuild file", "verify"),
        ("verify + fsync (fetch_verified's default)", "verify_fsync"),
        ("import: chunk, hash, build DAG, write CAR", "import"),
    ]
    for label, key in rows:
        cpu = r[f"{key}_cpu"]
        table.add_row(
            label, f"{r[key]:.0f}", f"{r[key] / r['sha256']:.2f}", f"{cpu:.0f}", f"{cpu / r['sha256_cpu']:.2f}"
        )
    Console(width=130).print(table)
    print(f"RESULT verify_vs_sha256={r['ratio']:.2f}")


if __name__ == "__main__":
    main()
