"""Keep the local IPFS node that `openlora serve` started alive.

A node that dies (killed, crashed, out of memory) is noticed within `poll_s`, reaped (no zombie
stays to fool a signal-0 check), its endpoints file removed, and restarted on the same ports, so
the gateway and API URLs the node's adapter source holds stay valid. A node that keeps dying is
restarted after exponential backoff (`backoff_s`, doubling up to `max_backoff_s`); one that stayed
up for `stable_s` starts again from no backoff. `up` and `restarts` feed /health and /metrics.

    supervisor = NodeSupervisor(node)               # node already started
    task = asyncio.create_task(supervisor.run())    # cancel it, then node.stop(), to shut down
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from node.adapters.ipfs.errors import LocalNodeError
from node.adapters.ipfs.localnode import LocalIpfsNode

log = logging.getLogger(__name__)
T = TypeVar("T")


class NodeSupervisor:
    def __init__(
        self,
        node: LocalIpfsNode,
        *,
        poll_s: float = 0.5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_s: float = 60.0,
    ) -> None:
        self.node = node
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.up = node.running
        self.restarts = 0  # successful restarts
        self.deaths = 0  # exits noticed
        self.last_error = ""  # why the node is down, for the log and /health
        self._up_since = time.monotonic()

    async def run(self) -> None:
        failures = 0  # consecutive deaths and failed starts without a stable run in between
        while True:
            await asyncio.sleep(self.poll_s)
            if self.node.running:
                continue
            pid, status = self.node.pid, self.node.returncode
            # Reap it and remove its endpoints file before reporting it down: whoever sees "down" finds no
            # zombie and no file that sends them to a dead port.
            await _finish_in_thread(self.node.stop)
            self.up = False
            self.deaths += 1
            failures = failures + 1 if time.monotonic() - self._up_since < self.stable_s else 0
            self.last_error = f"exited with status {status}"
            log.error("the local IPFS node (pid %s) %s; restarting it", pid, self.last_error)
            while True:
                if failures:
                    await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)))
                try:
                    await _finish_in_thread(self.node.start)
                    break
                except LocalNodeError as exc:
                    failures += 1
                    self.last_error = str(exc).splitlines()[0]
                    log.error("the local IPFS node did not restart: %s", exc)
            self.up, self._up_since = True, time.monotonic()
            self.restarts += 1
            log.warning("the local IPFS node is back: gateway %s (restart %d)", self.node.gateway_url, self.restarts)


async def _finish_in_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread; if we are cancelled meanwhile, let it finish first (a node half
    started or half stopped would be left to nobody)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
