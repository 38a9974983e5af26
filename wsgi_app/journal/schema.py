"""The journal's tables, their version, and one journaled call as a ``Row``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .log import Meta

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,          -- insertion order: oldest first, a request's order
    request TEXT NOT NULL,           -- the calls of one request share it
    origin TEXT NOT NULL,            -- "GET /signup" (and the request id) for the logs
    path TEXT NOT NULL,              -- "package.module:function"
    payload BLOB NOT NULL,           -- pickle of (args, kwargs)
    owner TEXT,                      -- the worker running it; NULL: free for any worker
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | dead
    attempts INTEGER NOT NULL DEFAULT 0,    -- failures so far (raised, or died with it)
    ready_at REAL NOT NULL DEFAULT 0,       -- not before this time (retry delay)
    created REAL NOT NULL,
    error TEXT,                      -- the last failure, one line
    app TEXT NOT NULL DEFAULT '',    -- the app it belongs to: only its workers claim it
    log_key INTEGER,                 -- its key in its owner's log (a running call's board entry)
    meta TEXT                        -- the call's own metadata (JSON), beside its arguments
);

-- log files whose calls are in calls already (between that commit and the file's removal)
CREATE TABLE IF NOT EXISTS moved_logs (name TEXT PRIMARY KEY);

CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,             -- host:pid:random, new at each start (exec keeps the pid)
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    heartbeat REAL NOT NULL
);
"""
VERSION = 2  # PRAGMA user_version: 2 added app, log_key, meta; attempts count failures
MIGRATE = (  # a journal of version 0 (made before calls knew their app)
    "ALTER TABLE calls ADD COLUMN app TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE calls ADD COLUMN log_key INTEGER",
    "ALTER TABLE calls ADD COLUMN meta TEXT",
    "UPDATE calls SET attempts = attempts - 1 WHERE state = 'pending' AND attempts > 0",
)
COLUMNS = "id, request, origin, path, payload, state, attempts, created, error, app, meta"

DIED = "its worker died while it ran"  # the error of a call its worker died running

# A call any worker of its app may claim: pending, due, and its owner gone (or none).
FREE = (
    "state = 'pending' AND ready_at <= :now"
    " AND (owner IS NULL OR owner NOT IN (SELECT id FROM workers))"
)


@dataclass
class Row:
    """One journaled call, as listed by the CLI or claimed for a run."""

    id: int
    request: str
    origin: str
    path: str
    payload: bytes
    state: str
    attempts: int  # failures so far
    created: float
    error: str | None
    app: str = ""
    meta: Meta = None

    @classmethod
    def of(cls, values: Sequence[Any]) -> Row:
        """A row from ``SELECT {COLUMNS}``."""
        *head, meta = values
        return cls(*head, meta=json.loads(meta) if meta else None)


def create(db: sqlite3.Connection) -> None:
    """(In the caller's transaction.) The tables, or an older journal's brought up to
    date."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    made = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'calls'").fetchone()
    if made is not None and version == 0:
        for statement in MIGRATE:
            db.execute(statement)
    for statement in _statements(SCHEMA):
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {VERSION}")


def _statements(script: str) -> list[str]:
    """The statements of an SQL script (``executescript`` would commit our transaction)."""
    found, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            found.append(current)
            current = ""
    return found


def moved_logs(db: sqlite3.Connection) -> set[str]:
    """The log files marked as moved into SQLite already."""
    return {name for (name,) in db.execute("SELECT name FROM moved_logs")}
