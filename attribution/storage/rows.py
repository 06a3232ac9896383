"""The SQLite journal's schema, and entries to and from rows.

Every signed field has its own column, so an operator can read the journal with the `sqlite3` shell.
uint128 amounts are 16-byte big-endian BLOBs: SQLite's INTEGER is a signed 64-bit value (9.2 OPEN in
wei) and BLOBs of one width compare like the numbers they hold, so interval and cap lookups stay
index range scans. Addresses keep the text the request carried; `payer_key` (its 20 bytes) is what
queries compare, case-insensitively. Signatures are the 65 bytes r || s || v.
"""

from __future__ import annotations

import sqlite3

from attribution.storage.entries import CommitTx, Entry, State, Usage, address_key
from attribution.types import InferenceRequest, Signature, UsageRecord

UNCOMMITTED_SQL = "state IN ('recorded', 'batched')"  # spelled alike in the partial indexes and queries

SCHEMA = f"""
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY,              -- append order: "oldest first"
    digest BLOB NOT NULL UNIQUE,
    state TEXT NOT NULL,
    batch_id INTEGER,
    recorded_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    adapter TEXT NOT NULL,
    payer TEXT, payer_key BLOB, node TEXT, adapter_id INTEGER, prompt_hash BLOB, input_tokens INTEGER,
    max_tokens INTEGER, max_charge BLOB, cumulative_cap BLOB, deadline INTEGER, request_sig BLOB,
    terms_version INTEGER NOT NULL, output_tokens INTEGER NOT NULL, adapter_amount BLOB NOT NULL,
    charge BLOB NOT NULL, response_hash BLOB NOT NULL, served_at INTEGER NOT NULL, record_sig BLOB
);
CREATE INDEX entries_state ON entries(state);  -- the rowid (seq) follows: in_state is oldest first
CREATE INDEX entries_batch ON entries(batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX entries_cap ON entries(payer_key, cumulative_cap) WHERE payer_key IS NOT NULL;
CREATE INDEX entries_uncommitted ON entries(payer_key, charge) WHERE {UNCOMMITTED_SQL};
CREATE INDEX entries_due ON entries(deadline) WHERE {UNCOMMITTED_SQL};

-- The request intervals (low, high] accepted per payer. Accepted intervals of a payer never overlap,
-- so ordered by `high` they are ordered by `low` too and one probe finds any overlap.
CREATE TABLE intervals (
    payer_key BLOB NOT NULL, high BLOB NOT NULL, low BLOB NOT NULL, PRIMARY KEY (payer_key, high)
) WITHOUT ROWID;

-- Entries per state, kept by triggers in the writing transaction: `depth` reads 7 rows, not the table.
CREATE TABLE depth (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER depth_insert AFTER INSERT ON entries BEGIN
    INSERT INTO depth VALUES (NEW.state, 1) ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER depth_update AFTER UPDATE OF state ON entries WHEN OLD.state != NEW.state BEGIN
    UPDATE depth SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO depth VALUES (NEW.state, 1) ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
"""

# MIGRATIONS[i] takes a journal of version i + 1 to version i + 2. A new file gets SCHEMA and then every
# migration, so a migrated journal and a new one have the same tables.
MIGRATIONS = (
    # 2: the commit transactions the submitter signed per batch, written before each is broadcast (seq: send order)
    """
CREATE TABLE commit_txs (
    seq INTEGER PRIMARY KEY, tx_hash BLOB NOT NULL UNIQUE, batch_id INTEGER NOT NULL, nonce INTEGER NOT NULL,
    sent_at REAL NOT NULL
);
CREATE INDEX commit_txs_batch ON commit_txs(batch_id);  -- the rowid (seq) follows: send order
""",
)
SCHEMA_VERSION = 1 + len(MIGRATIONS)

COLUMNS = (
    "digest, state, batch_id, recorded_at, updated_at, adapter, "
    "payer, payer_key, node, adapter_id, prompt_hash, input_tokens, max_tokens, max_charge, cumulative_cap, "
    "deadline, request_sig, terms_version, output_tokens, adapter_amount, charge, response_hash, served_at, record_sig"
)
INSERT = f"INSERT INTO entries ({COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS.split(', ')))})"
SELECT = f"SELECT {COLUMNS} FROM entries"

# The queries, each an index search (tests/attribution/storage/test_sqlite.py checks their plans).
GET = f"{SELECT} WHERE digest = ?"
IN_STATE = f"{SELECT} WHERE state = ? ORDER BY seq LIMIT ?"
IN_BATCH = f"{SELECT} WHERE batch_id = ? ORDER BY seq"
VOUCHER = f"{SELECT} WHERE payer_key = ? ORDER BY cumulative_cap DESC, seq DESC LIMIT 1"
DUE = f"{SELECT} INDEXED BY entries_due WHERE {UNCOMMITTED_SQL} AND deadline <= ? ORDER BY deadline, seq LIMIT ?"
UNCOMMITTED_CHARGES = f"SELECT charge FROM entries WHERE payer_key = ? AND {UNCOMMITTED_SQL}"
STATES_OF_BATCH = "SELECT digest, state, batch_id FROM entries WHERE batch_id = ? ORDER BY seq"
UPDATE_STATE = "UPDATE entries SET state = ?, batch_id = ?, updated_at = ? WHERE digest = ?"
DEPTH = "SELECT state, n FROM depth"
HAS_BATCHED = "SELECT 1 FROM entries WHERE batch_id = ? AND state = 'batched' LIMIT 1"
COMMIT_TX = "SELECT batch_id, tx_hash, nonce, sent_at FROM commit_txs WHERE tx_hash = ?"
COMMIT_TXS = "SELECT batch_id, tx_hash, nonce, sent_at FROM commit_txs WHERE batch_id = ? ORDER BY seq"
ADD_COMMIT_TX = "INSERT INTO commit_txs (batch_id, tx_hash, nonce, sent_at) VALUES (?, ?, ?, ?)"
# the accepted interval ending first after a new one's `low` is the only one that can overlap it
FIRST_ENDING_AFTER = "SELECT low, high FROM intervals WHERE payer_key = ? AND high > ? ORDER BY high LIMIT 1"
HIGHEST_CAP = "SELECT high FROM intervals WHERE payer_key = ? ORDER BY high DESC LIMIT 1"
ACCEPT = "INSERT INTO intervals VALUES (?, ?, ?)"


def states_of(count: int) -> str:
    return f"SELECT digest, state, batch_id FROM entries WHERE digest IN ({','.join('?' * count)})"


def u128(value: int) -> bytes:
    return value.to_bytes(16, "big")


def _sig(signature: Signature | None) -> bytes | None:
    return None if signature is None else signature.to_bytes()


def _unsig(raw: bytes | None) -> Signature | None:
    return None if raw is None else Signature(v=raw[64], r=raw[:32], s=raw[32:64])


def to_row(entry: Entry) -> tuple[object, ...]:
    usage, q, r = entry.usage, entry.usage.request, entry.usage.record
    head = (r.request_digest, entry.state.value, entry.batch_id, entry.recorded_at, entry.updated_at, usage.adapter)
    if q is None:
        request: tuple[object, ...] = (None,) * 11
    else:
        request = (
            q.payer,
            address_key(q.payer),
            q.node,
            q.adapter_id,
            q.prompt_hash,
            q.input_tokens,
            q.max_tokens,
            u128(q.max_charge),
            u128(q.cumulative_cap),
            q.deadline,
            _sig(usage.request_signature),
        )
    record = (
        r.terms_version,
        r.output_tokens,
        u128(r.adapter_amount),
        u128(r.charge),
        r.response_hash,
        r.served_at,
        _sig(usage.record_signature),
    )
    return head + request + record


def from_row(row: sqlite3.Row | tuple[object, ...]) -> Entry:
    (
        digest,
        state,
        batch_id,
        recorded_at,
        updated_at,
        adapter,
        payer,
        _,
        node,
        adapter_id,
        prompt_hash,
        input_tokens,
        max_tokens,
        max_charge,
        cumulative_cap,
        deadline,
        request_sig,
        terms_version,
        output_tokens,
        adapter_amount,
        charge,
        response_hash,
        served_at,
        record_sig,
    ) = row
    request = None
    if payer is not None:
        request = InferenceRequest(
            payer,
            node,
            adapter_id,
            prompt_hash,
            input_tokens,
            max_tokens,
            int.from_bytes(max_charge),
            int.from_bytes(cumulative_cap),
            deadline,
        )
    record = UsageRecord(
        digest,
        terms_version,
        output_tokens,
        int.from_bytes(adapter_amount),
        int.from_bytes(charge),
        response_hash,
        served_at,
    )
    usage = Usage(request, _unsig(request_sig), record, _unsig(record_sig), adapter)
    return Entry(usage, State(state), batch_id, recorded_at, updated_at)


def commit_tx(row: tuple[object, ...]) -> CommitTx:
    batch_id, tx_hash, nonce, sent_at = row
    return CommitTx(batch_id, bytes(tx_hash), nonce, sent_at)
