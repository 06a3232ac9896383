"""Appends to a `SqliteJournal` until it is killed, writing one line per acknowledged write:
`R i` once request i's interval is reserved, `A i` once its entry is appended (test_crash.py).

Usage: python -m tests.attribution.storage.journal_child PATH START
Asyncio tasks reserve and append requests START, START+1, ...; a thread appends START+500000, ...
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading

from attribution.storage import SqliteJournal
from tests.attribution.storage.factory import paid

THREAD_OFFSET = 500_000
_out = threading.Lock()


def acknowledge(kind: str, i: int) -> None:
    with _out:
        sys.stdout.write(f"{kind} {i}\n")
        sys.stdout.flush()


async def main(path: str, start: int, tasks: int = 16) -> None:
    journal = SqliteJournal(path)
    indices = itertools.count(start)

    async def appender() -> None:
        while True:
            usage = paid(next(indices))
            i = usage.request.cumulative_cap // usage.request.max_charge - 1
            await journal.reserve(usage.request.payer, *usage.request.interval)
            acknowledge("R", i)
            await journal.append(usage)
            acknowledge("A", i)

    def thread_appender() -> None:
        for i in itertools.count(start + THREAD_OFFSET):
            journal.append_blocking(paid(i))
            acknowledge("A", i)

    threading.Thread(target=thread_appender, daemon=True).start()
    await asyncio.gather(*(appender() for _ in range(tasks)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
