"""What attribution costs the node (issue 10), one section per part; the last line is machine-readable.

node: the same chat workload (concurrent requests round-robin over the demo adapters and the base model,
greedy, EOS ignored, a fixed number of new tokens) against a chain-backed node with signed requests (the dApp
client signs every request before the clock starts, as a dApp does on its own machine, and verifies each usage
record; the node checks, prices, signs, journals with fsync, batches and commits on a real anvil) and against the same node without a chain (records off, the plain
`openai` client). Each system runs in its own node process lifetime (one engine at a time: two OpenMP pools
slow each other), interleaved over repeats; medians. The bundled SmolLM2-135M-Instruct unless --model.

journal: signed usage entries appended to a fresh `SqliteJournal` (WAL, synchronous=FULL: every
commit is fsynced) by concurrent appenders, asyncio tasks or threads, each waiting for its entry to
be durable before appending the next; group commit batches them into one transaction and one fsync.
The peer is the naive journal: the same schema, rows and pragmas, one transaction (one fsync) per
record, as a handler that commits its own record would do. Systems are interleaved in every repeat
(the disk and the 2 CPUs are shared, so noise hits all alike); medians are reported. Entries are
built before timing, with random signature bytes (the journal stores signatures, it does not check them).

    RESULT attribution_overhead=<1 - signed tokens/s / open tokens/s>   (target: <= 0.03)
           journal_records_per_s=<records/s, 64 asyncio appenders>     (target: >= 5000)

Usage: .venv/bin/python scripts/bench_attribution.py [--quick] [--repeats N] [--records N] [--dir DIR] [--model DIR]
                                                     [--only node|journal]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attribution.storage import SqliteJournal, Usage
from attribution.storage.entries import Entry, State
from attribution.storage.rows import INSERT, SCHEMA, to_row
from attribution.types import InferenceRequest, Signature, UsageRecord

HEADLINE = "asyncio tasks", 64  # the journal_records_per_s configuration: a node finishing 64 requests at once


def usages(n: int) -> list[Usage]:
    payers = ["0x" + os.urandom(20).hex() for _ in range(16)]
    out = []
    for i in range(n):
        sig = Signature(27, os.urandom(32), os.urandom(32))
        request = InferenceRequest(payers[i % 16], "0x" + "11" * 20, 1 + i % 50, os.urandom(32), 100, 256,
                                   10**15, 10**15 * (i // 16 + 1), 1_800_000_000)  # fmt: skip
        record = UsageRecord(os.urandom(32), 1, 200, 6 * 10**14, 9 * 10**14, os.urandom(32), 1_799_999_990)
        out.append(Usage(request, sig, record, sig, f"adapter-{i % 50}"))
    return out


async def _tasks(journal: SqliteJournal, work: list[Usage], appenders: int) -> None:
    pending = iter(work)

    async def appender() -> None:
        for usage in pending:
            await journal.append(usage)

    await asyncio.gather(*(appender() for _ in range(appenders)))


def _threads(journal: SqliteJournal, work: list[Usage], appenders: int) -> None:
    lock, pending = threading.Lock(), iter(work)

    def appender() -> None:
        while True:
            with lock:
                usage = next(pending, None)
            if usage is None:
                return
            journal.append_blocking(usage)

    threads = [threading.Thread(target=appender) for _ in range(appenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def group_commit(path: Path, work: list[Usage], kind: str, appenders: int) -> tuple[float, float, float]:
    """(records/s, records per CPU second of this process, mean records per commit) of SqliteJournal
    with `appenders` concurrent appenders."""
    journal = SqliteJournal(path)
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "asyncio tasks":
        asyncio.run(_tasks(journal, work, appenders))
    else:
        _threads(journal, work, appenders)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    groups, ops = journal.commits
    journal.close_blocking()
    return len(work) / elapsed, len(work) / cpu, ops / groups


def naive(path: Path, work: list[Usage]) -> tuple[float, float, float]:
    """The peer: one BEGIN / INSERT / COMMIT (one fsync) per record, same schema and pragmas."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(SCHEMA)
    start, cpu = time.perf_counter(), time.process_time()
    for usage in work:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INSERT, to_row(Entry(usage, State.RECORDED, None, now, now)))
        conn.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    conn.close()
    return len(work) / elapsed, len(work) / cpu, 1.0


def journal_section(quick: bool, repeats: int, records: int, directory: str | None, console: Console) -> dict[str, str]:
    records = 2_000 if quick else records
    work = usages(records)
    few = work[: records // 8]  # one fsync per record: an eighth is plenty to measure the serial rates
    systems: list[tuple[str, int, list[Usage], Callable[[Path], tuple[float, float, float]]]] = [
        ("naive: one transaction per record", 1, few, lambda p: naive(p, few)),
        ("asyncio tasks", 1, few, lambda p: group_commit(p, few, "asyncio tasks", 1)),
        *[("asyncio tasks", n, work, lambda p, n=n: group_commit(p, work, "asyncio tasks", n)) for n in (16, 64, 256)],
        ("threads", 8, work, lambda p: group_commit(p, work, "threads", 8)),
    ]
    runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {(name, n): [] for name, n, _, _ in systems}
    for _ in range(repeats):
        for name, n, _, run in systems:
            scratch = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=directory))
            try:
                runs[name, n].append(run(scratch / "journal.db"))
            finally:
                shutil.rmtree(scratch)
    median = {key: [statistics.median(column) for column in zip(*r)] for key, r in runs.items()}
    base = median["naive: one transaction per record", 1][0]
    table = Table(title=f"journal: signed entries appended with fsync (WAL, synchronous=FULL), median of {repeats}")
    for column in ("appenders", "concurrent", "records", "records/s", "vs naive", "records/CPU s", "per commit"):
        table.add_column(column, justify="left" if column == "appenders" else "right")
    for name, n, items, _ in systems:
        rate, per_cpu, group = median[name, n]
        label = name if name.startswith("naive") else f"SqliteJournal group commit, {name}"
        table.add_row(
            label, str(n), str(len(items)), f"{rate:.0f}", f"{rate / base:.2f}", f"{per_cpu:.0f}", f"{group:.1f}"
        )
    console.print(table)
    return {"journal_records_per_s": f"{median[HEADLINE][0]:.0f}"}


async def _serve(settings) -> tuple:
    from node.api.app import create_app
    from node.api.server import start_server

    app = create_app(settings)
    runner, url = await start_server(app, "127.0.0.1", 0)
    return app, runner, url


async def _open_run(url: str, models: list[str], n: int, tokens: int, concurrency: int) -> tuple[int, float]:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with gate:
                answer = await client.chat.completions.create(
                    model=models[i % len(models)], messages=[{"role": "user", "content": f"Tell me a story {i}"}],
                    max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True},
                )  # fmt: skip
                return answer.usage.completion_tokens

        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(done), time.perf_counter() - start


async def _signed_run(
    url: str, key: str, model_dir: str, caps: Path, models: list[str], n: int, tokens: int, concurrency: int
) -> tuple[int, float]:
    from attribution.caps import CapLedger
    from attribution.client import OpenLoRAClient, build_chat_body

    async with OpenLoRAClient(url, key, tokenizer=model_dir, ledger=CapLedger(caps)) as client:
        # Signing is the dApp's work, on the dApp's machine: done before the clock starts, so that the
        # time is the node's (checks, pricing, record signing, journal fsync, batching) and the
        # client's receipt check. The bodies are the open run's.
        signed = [
            await client.prepare(build_chat_body(
                models[i % len(models)], [{"role": "user", "content": f"Tell me a story {i}"}],
                max_tokens=tokens, temperature=0, ignore_eos=True,
            ))  # fmt: skip
            for i in range(n)
        ]
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with gate:
                return (await client.send_signed(signed[i])).record.output_tokens

        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(done), time.perf_counter() - start


async def _node_runs(quick: bool, repeats: int, model: str | None) -> dict[str, list[float]]:
    from node.config import Settings
    from node.devnet import local_network
    from node.engine.prepare import prepare_model

    n, tokens, concurrency = (16, 32, 8) if quick else (48, 64, 16)
    base = Settings(port=0, model=model, max_loras=4)
    base = base.model_copy(update={"model": str(prepare_model(base))})
    rates: dict[str, list[float]] = {"open": [], "signed": []}
    with tempfile.TemporaryDirectory(prefix="bench-attribution-") as tmp:
        work = Path(tmp)
        async with local_network(base, work / "devnet", ipfs_repo=work / "ipfs", serve=False) as net:
            signed_settings = net.settings.model_copy(update={"batch_interval": 5.0})
            open_settings = base.model_copy(
                update={"ipfs_gateways": [net.ipfs.gateway_url], "adapter_index": net.provisioned.adapter_index,
                        "cache_dir": work / "open-cache"}
            )  # fmt: skip
            key = net.provisioned.payer_key.read_text().strip()
            for repeat in range(repeats + 1):  # the first round warms caches (adapters fetched, kernels built)
                for system in ("open", "signed"):
                    app, runner, url = await _serve(signed_settings if system == "signed" else open_settings)
                    try:
                        from node.api.keys import ENGINE

                        models = [*net.provisioned.adapters, app[ENGINE].model_name]
                        if system == "open":
                            done, seconds = await _open_run(url, models, n, tokens, concurrency)
                        else:
                            done, seconds = await _signed_run(
                                url, key, base.model, work / "caps.json", models, n, tokens, concurrency
                            )
                    finally:
                        await runner.cleanup()
                    if repeat:
                        rates[system].append(done / seconds)
    return rates


def node_section(quick: bool, repeats: int, model: str | None, console: Console) -> dict[str, str]:
    rates = asyncio.run(_node_runs(quick, repeats, model))
    open_rate, signed_rate = statistics.median(rates["open"]), statistics.median(rates["signed"])
    table = Table(title=f"node: paid vs free serving, tokens/s, median of {repeats}")
    for column in ("system", "tokens/s", "vs open", "runs"):
        table.add_column(column, justify="left" if column == "system" else "right")
    table.add_row("open: no chain, unsigned (openai client)", f"{open_rate:.1f}", "1.000",
                  " ".join(f"{r:.1f}" for r in rates["open"]))  # fmt: skip
    table.add_row("signed: chain, records journaled and committed (dApp client)", f"{signed_rate:.1f}",
                  f"{signed_rate / open_rate:.3f}", " ".join(f"{r:.1f}" for r in rates["signed"]))  # fmt: skip
    console.print(table)
    return {"attribution_overhead": f"{1 - signed_rate / open_rate:.3f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 records, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--dir", help="where the journals are written (default: the temp dir); same disk as a node's")
    parser.add_argument("--model", help="a local HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--only", choices=("node", "journal"), help="run one section (its RESULT key only)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    console = Console(width=130)
    result: dict[str, str] = {}
    if args.only != "journal":
        result.update(node_section(args.quick, repeats, args.model, console))
    if args.only != "node":
        result.update(journal_section(args.quick, repeats, args.records, args.dir, console))
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
