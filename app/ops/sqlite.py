"""The one way this service opens its SQLite state (audit trail, study store, outbox).

Each is written from one connection behind its owner's lock, read by the operator commands
through read-only URIs, and must survive a power cut once a write returns: WAL mode with
``synchronous=FULL``, a busy timeout for the readers, and a file only the service user can read
(study and SOP Instance UIDs can be linked to patients in the PACS).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def open_state_db(
    path: Path, schema: str, version: int, *, rows: bool = False
) -> sqlite3.Connection:
    """Create (mode 0600) or open ``path``, apply ``schema`` (idempotent DDL) and stamp
    ``user_version``; autocommit (``isolation_level=None``), shareable across threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    if rows:
        conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(schema)
    conn.execute(f"PRAGMA user_version={version}")
    return conn
