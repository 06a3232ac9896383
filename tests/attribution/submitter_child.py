"""A node's submitter in a process of its own, for test_recovery.py to kill: it opens the journal and commits
the next batch (`Submitter.commit_next`).

Usage: python -m tests.attribution.submitter_child CONFIG_JSON
CONFIG_JSON: {"rpc_url", "deployments" (a deployments file), "key", "node", "ipfs_api_url", "journal",
"batch_dir", "crash"}. With "crash": "before-broadcast" the process SIGKILLs itself right after the first
commit transaction is journaled (durably) and before it is broadcast; otherwise the test kills it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from attribution.deploy import Deployments
from attribution.storage import CommitTx, SqliteJournal
from tests.attribution.submitting import submitter_at


async def main(config: dict[str, str]) -> None:
    journal = SqliteJournal(config["journal"])
    _, submitter = await submitter_at(
        config["rpc_url"], Deployments.load(config["deployments"]), config["key"], config["node"],
        config["ipfs_api_url"], journal, Path(config["batch_dir"]),
    )  # fmt: skip
    if config["crash"] == "before-broadcast":
        journal_tx = journal.add_commit_tx

        async def journal_tx_then_die(batch_id: int, tx_hash: bytes, nonce: int) -> CommitTx:
            await journal_tx(batch_id, tx_hash, nonce)  # returns once it is on disk
            print(f"journaled 0x{tx_hash.hex()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable")

        journal.add_commit_tx = journal_tx_then_die
    await submitter.commit_next()
    print("committed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
