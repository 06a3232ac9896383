"""The `journal` fixture: every conformance test runs against each implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from attribution.storage import Journal, MemoryJournal, SqliteJournal


def open_journal(kind: str, path: Path) -> Journal:
    return MemoryJournal() if kind == "memory" else SqliteJournal(path / "journal.db")


@pytest.fixture(params=["memory", "sqlite"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    opened = open_journal(request.param, tmp_path)
    yield opened
    await opened.close()
