"""Taking over: the calls of gone workers, and those due for a retry, claimed by a
worker of their app (the ``Takeover`` half of ``Journal``)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import wsgi_app.journal.board as journal_board
import wsgi_app.journal.log as journal_log

from .schema import COLUMNS, DIED, FREE, Row, moved_logs

log = logging.getLogger("wsgi_app.deferred")

LEASE = 60.0  # seconds without a heartbeat after which a worker's calls are taken over
CLAIM_REQUESTS = 128  # requests claimed at most per look (whole: their order is kept)
CLAIM_ROWS = 5000  # and calls, unless a single request has more


class Takeover:
    """``Journal.claim`` and what it needs: the journal's attributes it reads are
    declared here, set by ``Journal``."""

    path: Path
    logs: Path
    worker: str
    app: str | None
    attempts: int
    _writing: threading.Lock
    _db: Callable[[], sqlite3.Connection]
    _register: Callable[[], None]
    _insert: Callable[[sqlite3.Connection, Sequence[tuple]], list[int]]
    _remove: Callable[[list[Path]], None]

    def claim(self, requests: int = CLAIM_REQUESTS) -> list[list[Row]]:
        """Take this app's free calls (their worker gone, or due for a retry): up to
        ``requests`` requests, whole, and ``CLAIM_ROWS`` calls unless one request has
        more; return them grouped by request, oldest request first, each in its order.

        The log files of gone workers are read into SQLite first, whatever their app
        (that app's workers claim them), and the calls a gone worker's board says were
        running have failed once: one that kills its worker every time (a segfault, an
        OOM) is dead after ``attempts`` deaths. A call that had not started, or that a
        clean stop cut, has used no attempt. ``requests=0`` only does that reading.
        """
        self._register()
        assert self.app is not None, "a journal opened for every app claims nothing"
        if not self._claimable(self._db(), time.time(), requests):
            return []  # the usual case: no write lock taken, serving threads never wait
        with self._writing:
            claimed, worn, read = self._take(self._db(), time.time(), requests)
        self._remove(read)  # committed: what fails here must not keep the calls from running
        for row in worn:
            log.error(
                "deferred %s dead after %d failed attempt(s) (request %s): %s",
                row.path,
                row.attempts,
                row.origin,
                row.error or DIED,
            )
        groups: dict[str, list[Row]] = {}
        for row in sorted(claimed, key=lambda r: r.id):
            groups.setdefault(row.request, []).append(row)
        return list(groups.values())

    def _claimable(self, db: sqlite3.Connection, now: float, requests: int) -> bool:
        """Whether a claim would find anything: gone workers, files of workers unknown
        (a read: no lock), or (``requests``) this app's calls."""
        workers = {wid: row for wid, *row in db.execute("SELECT * FROM workers")}
        if any(wid != self.worker and _gone(*row, now) for wid, row in workers.items()):
            return True
        present = journal_log.files(self.logs)
        writers = {journal_log.owner(path) for path in present}
        writers |= {journal_board.owner(path) for path in journal_board.files(self.logs)}
        if writers - {*workers, self.worker}:
            return True
        if moved_logs(db) - {path.name for path in present}:
            return True  # a mark whose file is gone (its removal failed): to tidy
        if requests <= 0:
            return False
        found = db.execute(
            f"SELECT 1 FROM calls WHERE {FREE} AND app = :app LIMIT 1",
            {"now": now, "app": self.app},
        ).fetchone()
        return found is not None

    def _take(
        self, db: sqlite3.Connection, now: float, requests: int
    ) -> tuple[list[Row], list[Row], list[Path]]:
        """In one transaction: read the log files of gone workers, count a failure for
        what they were running, forget them, mark this app's calls past their attempts
        dead, own its free calls. Returns (claimed, worn out, files to remove)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            workers = {wid: row for wid, *row in db.execute("SELECT * FROM workers")}
            gone = [w for w, row in workers.items() if w != self.worker and _gone(*row, now)]
            alive = {w for w in workers if w not in gone} | {self.worker}
            read = self._read_logs(db, alive)
            for writer in gone:
                _count_deaths(db, writer, journal_board.running(self._board_of(writer)))
            db.executemany("DELETE FROM workers WHERE id = ?", [(w,) for w in gone])
            boards = journal_board.files(self.logs)
            read += [path for path in boards if journal_board.owner(path) not in alive]
            params = {"now": now, "app": self.app, "me": self.worker, "most": self.attempts}
            worn = db.execute(
                f"UPDATE calls SET state = 'dead', owner = NULL WHERE {FREE} AND app = :app"
                f" AND attempts >= :most RETURNING {COLUMNS}",
                params,
            ).fetchall()
            chosen = self._choose(db, params, requests)
            claimed = db.execute(
                f"UPDATE calls SET owner = :me, log_key = NULL WHERE {FREE} AND app = :app"
                " AND request IN (SELECT value FROM json_each(:chosen))"
                f" RETURNING {COLUMNS}",
                {**params, "chosen": json.dumps(chosen)},
            ).fetchall()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return [Row.of(r) for r in claimed], [Row.of(r) for r in worn], read

    def _choose(self, db: sqlite3.Connection, params: dict[str, Any], requests: int) -> list[str]:
        """(In ``_take``.) The oldest free requests of this app to claim, whole."""
        if requests <= 0:
            return []
        chosen, rows = [], 0
        for request, count in db.execute(
            f"SELECT request, count(*) FROM calls WHERE {FREE} AND app = :app"
            " GROUP BY request ORDER BY min(id) LIMIT :n",
            {**params, "n": requests},
        ):
            if chosen and rows + count > CLAIM_ROWS:
                break
            chosen.append(request)
            rows += count
        return chosen

    def _board_of(self, worker: str) -> Path:
        return journal_board.path_for(self.logs, worker)

    def _read_logs(self, db: sqlite3.Connection, alive: set[str]) -> list[Path]:
        """(In ``_take``'s transaction.) Insert the calls not said to have ended in the
        log files of workers not ``alive``, owned by their writer (gone: the claim takes
        them). Returns those files and the ones already moved, to remove once committed."""
        moved = moved_logs(db)
        present = journal_log.files(self.logs)
        stale = moved - {path.name for path in present}  # files removed, not their marks
        db.executemany("DELETE FROM moved_logs WHERE name = ?", [(name,) for name in stale])
        done = [path for path in present if path.name in moved]
        unread = journal_log.by_owner(
            path
            for path in present
            if path.name not in moved and journal_log.owner(path) not in alive
        )
        for writer, paths in unread.items():
            try:
                calls = list(journal_log.pending(paths))
            except OSError:  # left for a later claim: the others are taken meanwhile
                log.exception("deferred journal %s: reading %s failed", self.path, paths)
                continue
            rows = [
                (c.request, c.origin, c.path, c.payload, writer, c.created, c.app, c.key, c.meta)
                for c in calls
            ]
            self._insert(db, rows)
            marks = [(path.name,) for path in paths]
            db.executemany("INSERT OR IGNORE INTO moved_logs VALUES (?)", marks)
            done += paths
        return done


def _count_deaths(db: sqlite3.Connection, writer: str, running: set[int]) -> None:
    """(In ``_take``.) The calls ``writer`` was running when it died (keys in its log,
    or row ids it claimed) have failed once."""
    if not running:
        return
    keys = json.dumps([value for value in running if value < 0])
    ids = json.dumps([value for value in running if value > 0])
    db.execute(
        "UPDATE calls SET attempts = attempts + 1, error = ? WHERE owner = ?"
        " AND state = 'pending' AND (log_key IN (SELECT value FROM json_each(?))"
        " OR id IN (SELECT value FROM json_each(?)))",
        (DIED, writer, keys, ids),
    )


def _gone(host: str, pid: int, heartbeat: float, now: float) -> bool:
    """A worker is gone when its lease ran out, or (on this host) its pid is not alive,
    or is this very process under an earlier id (an exec in place keeps the pid)."""
    if now - heartbeat > LEASE:
        return True
    if host != socket.gethostname():
        return False
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process here. fcgi.ops.scoreboard has the same check:
    written twice on purpose, since fcgi/ and wsgi_app/ never import each other."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
