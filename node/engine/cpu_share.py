"""How many threads the engine computes with, given what else runs on its CPUs.

Each decode step runs a few hundred OpenMP parallel regions, each ending in a barrier that waits
for every thread of the team. On CPUs that other processes keep busy, a thread of ours is often
not scheduled when its partner reaches a barrier, and libgomp's waiter spins (up to
GOMP_SPINCOUNT, 300k pauses: ~15 ms on this Xeon) before it sleeps: every barrier then costs
scheduler latency. Measured on the 2-core machine: with a process busy on one core, 53 tokens/s
with two threads against 156 with one (alone: 225 and 166); under other agents' load 3.5-4.4
against 52-61 (BENCHMARKS.md). A neighbour busy a quarter to three quarters of the time costs two
threads no more than one. Passive waiting everywhere would cost a futex wake per region on a
quiet machine (1.5x per step, node/threads.py).

So the engine thread asks `CpuShare.threads()` between steps: twice a second it reads how
busy its CPUs were (/proc/stat: every CPU of its affinity, steal time included) and how much of
that was this process (/proc/self/stat), and computes with as many threads as there are CPUs
left to it (a CPU counts as taken from half its time on), between 1 and the configured maximum.
Fewer threads apply at once (two threads on a taken CPU cost 3-12x); more need two readings in a
row that agree, so a passing lull does not bring the barriers back. Without /proc it keeps the
maximum.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

# /proc/stat columns after the CPU name: user nice system idle iowait irq softirq steal ...
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


class CpuShare:
    def __init__(self, max_threads: int, interval_s: float = 0.5) -> None:
        self.max_threads = max_threads
        self.interval_s = interval_s
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.current = max_threads
        self.others = 0.0  # CPUs' worth of time other processes took over the last interval
        self._proposal: int | None = None
        self._last = self._sample()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def threads(self) -> int:
        """The thread count to compute with now (cheap: reads /proc at most once per interval)."""
        now = time.monotonic()
        if self._last is None or now - self._last[0] < self.interval_s:
            return self.current
        sample = self._sample()
        if sample is None:
            return self.current
        wall = sample[0] - self._last[0]
        busy = (sample[1] - self._last[1]) / self._tick
        own = (sample[2] - self._last[2]) / self._tick
        self._last = sample
        return self.update(max(0.0, busy - own) / wall)

    def update(self, others: float) -> int:
        """Take a reading (CPUs' worth of time other processes took): the thread count now."""
        self.others = others
        want = max(1, min(self.max_threads, math.floor(len(self.cpus) - others + 0.5)))
        if want < self.current or want == self._proposal:
            self.current = want
        self._proposal = want
        return self.current

    def _sample(self) -> tuple[float, int, int] | None:
        """(monotonic time, busy ticks of our CPUs, this process's ticks), or None without /proc."""
        try:
            stat = Path("/proc/stat").read_text().splitlines()
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        wanted = {f"cpu{c}" for c in self.cpus}
        busy = 0
        for line in stat:
            name, _, rest = line.partition(" ")
            if name in wanted:
                fields = rest.split()
                busy += sum(int(fields[i]) for i in _BUSY_COLUMNS)
        # after the command name: state is field 0, utime and stime are fields 11 and 12
        return time.monotonic(), busy, int(own[11]) + int(own[12])
