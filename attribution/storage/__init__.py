"""The node's durable usage journal: what was served and signed, each entry's way to the chain, and
the request intervals accepted per payer (uniqueness, spec P2). See `journal.Journal` for the interface."""

from attribution.storage.entries import TRANSITIONS, CommitTx, Entry, State, Usage
from attribution.storage.journal import Journal
from attribution.storage.memory import MemoryJournal
from attribution.storage.sqlite import SqliteJournal

__all__ = ["TRANSITIONS", "CommitTx", "Entry", "Journal", "MemoryJournal", "SqliteJournal", "State", "Usage"]
