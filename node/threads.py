"""Keeping the engine thread the only one with an OpenMP thread pool.

torch's CPU ops run on GNU OpenMP (libgomp). Every thread that runs a parallel op keeps a pool of
worker threads for as long as it lives, and once libgomp manages more threads than there are
CPUs it stops letting idle workers spin: each parallel region then has to wake its workers
through the kernel. Measured on the 2-core CI machine: a model that was loaded on another thread
(main, or an executor thread) made every decode step of the engine thread 1.5x slower, and
single GEMMs 2.3x slower.

So work that runs parallel torch ops outside the engine thread (loading the model, loading an
adapter, a benchmark's peer) runs in a thread of its own that ends when the work ends, and its
pool with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args, name: str = "openlora-worker") -> T:
    """fn(*args) in a new thread that ends with it; blocks until then. Returns fn's result or
    raises its exception."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            error.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
