"""The deferred-work journal: calls written to SQLite before the visitor has the response.

One database file per machine (``DEFERRED_JOURNAL=var/lib/deferred.sqlite3``),
shared by every worker of the pool. A request's calls are appended to the
worker's log file before the response is finished (``wsgi_app.journal_log``: one
``write``), moved into SQLite by the worker's sweeper if they are still pending a
``MOVE_EVERY`` later, deleted once they end, and claimed by another worker when
theirs is gone: its pid no longer alive, or its heartbeat older than ``LEASE``
seconds (its log files are read into SQLite first). So once the visitor has the
page, the calls run at least once even if the worker is SIGKILLed, OOM-killed or
crashes; only a call running at that moment (or ended in the ``DONE_DELAY`` before)
may run twice.

A failing call is retried (after ``retry`` seconds, doubling) until it has been
tried ``attempts`` times; then it stays in the journal as dead, for
``python -m wsgi_app.journal`` to list, retry or purge.

SQLite in WAL mode with ``synchronous=NORMAL``: a commit is a write to the WAL
file without fsync, which survives the death of the process (the kernel has the
bytes) but not of the machine (power loss may drop the last commits).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import wsgi_app.journal.log as journal_log

from ..runtime.cpus import background
from .log import CallLog

log = logging.getLogger("wsgi_app.deferred")

LEASE = 60.0  # seconds without a heartbeat after which a worker's calls are taken over
HEARTBEAT = 5.0  # seconds between heartbeats (and between looks for orphaned calls: POLL)
POLL = 1.0  # seconds between looks for calls to claim
DONE_DELAY = 0.02  # seconds an ended call may wait before it is deleted, with others
INSERT_ROWS = 1000  # calls per INSERT statement (SQLite's limit on variables: 32766)
CLAIM_ROWS = 500  # calls claimed at most per look (whole requests: their order is kept)

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,          -- insertion order: oldest first, a request's order
    request TEXT NOT NULL,           -- the calls of one request share it
    origin TEXT NOT NULL,            -- "GET /signup" (and the request id) for the logs
    path TEXT NOT NULL,              -- "package.module:function"
    payload BLOB NOT NULL,           -- pickle of (args, kwargs)
    owner TEXT,                      -- the worker running it; NULL: free for any worker
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | dead
    attempts INTEGER NOT NULL DEFAULT 1,    -- runs given to it (a claim counts as one)
    ready_at REAL NOT NULL DEFAULT 0,       -- not before this time (retry delay)
    created REAL NOT NULL,
    error TEXT                       -- the last failure, one line
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


# journal file -> (pid, worker id): one id per process and file, shared by every Journal
# object on it (two middlewares in one process must not take each other's calls).
_ids: dict[str, tuple[int, str]] = {}
_ids_lock = threading.Lock()
# journal file -> the lock its writers in this process take: threads queue on it and
# wake at once, instead of meeting SQLite's busy handler, which sleeps 1 ms and more
_write_locks: dict[str, threading.Lock] = {}
# this process's Journal objects: counts() adds the calls only in the logs of them all
_journals: weakref.WeakSet[Journal] = weakref.WeakSet()


def _write_lock(path: Path) -> threading.Lock:
    with _ids_lock:
        return _write_locks.setdefault(str(path.resolve()), threading.Lock())


@dataclass
class Row:
    """One journaled call, as listed by the CLI or claimed for a run."""

    id: int
    request: str
    origin: str
    path: str
    payload: bytes
    state: str
    attempts: int
    created: float
    error: str | None


class Journal:
    """The SQLite store of deferred calls; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike[str], attempts: int = 5, retry: float = 10.0):
        self.path = Path(path)
        self.attempts = attempts  # runs before a failing call is declared dead
        self.retry = retry  # seconds before the first retry; doubles each time
        self._local = threading.local()
        self._pid = 0
        self.worker = ""
        self._requests = 0
        self._lock = threading.Lock()
        self._writing = _write_lock(self.path)
        self._done: list[int] = []  # ended calls not yet deleted (see done())
        self._ended: list[int] = []  # keys of ended calls still in the log, not yet said so
        self._done_lock = threading.Condition()
        self._flusher_pid = 0
        # calls recorded in this process's log (keys below 0, rows' ids above): not yet
        # in SQLite, being moved there, moved (their row ids); a call ending while it
        # moves is deleted once the move is committed
        real = self.path.resolve()  # every name of the file (SQLite follows symlinks): one log
        self.logs = real.with_name(real.name + ".logs")
        self._log: CallLog | None = None
        self._keys = itertools.count(1)
        self._state = threading.Condition()
        self._unmoved: dict[int, tuple] = {}  # key: the row it becomes
        self._moving: set[int] = set()
        self._ended_moving: set[int] = set()
        self._inserting: set[int] = set()  # failing calls whose row failed() is inserting
        self._rows: dict[int, int] = {}
        _journals.add(self)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._db()
        db.execute("PRAGMA page_size=1024")  # a new file only: rows are small, so are commits
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)

    # -- connections -------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: SQLite's may not cross it)."""
        owned = getattr(self._local, "owned", None)
        if owned is None or owned.pid != os.getpid():
            if owned is not None:  # the parent's, inherited: never closed here (see _Owned)
                owned.db = None
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            # no checkpoint (its fsync) on a serving thread: the sweeper does them
            db.execute("PRAGMA wal_autocheckpoint=0")
            owned = self._local.owned = _Owned(db)
        return owned.db

    def close(self) -> None:
        """Close this thread's connection (a CLI run, a test); another call reopens it."""
        self._local.owned = None

    def _register(self) -> None:
        """Enter this process in ``workers`` (again after a fork or an exec)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with _ids_lock:
            if self._pid == pid:
                return
            if self._log is None or self._log.pid != pid:  # a fork: the parent's are not ours
                with self._state:
                    self._unmoved.clear()
                    self._moving.clear()
                    self._rows.clear()
                self._log = None
            key = str(self.path.resolve())
            known = _ids.get(key)
            if known is not None and known[0] == pid:
                self.worker = known[1]
            else:
                self.worker = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
                _ids[key] = (pid, self.worker)
            self._db().execute(
                "INSERT OR REPLACE INTO workers (id, host, pid, heartbeat) VALUES (?, ?, ?, ?)",
                (self.worker, socket.gethostname(), pid, time.time()),
            )
            if self._log is None:
                self._log = CallLog(self.logs, self.worker)
                # an exit with no drain hook (gunicorn's drain() runs the executors only):
                # the ended calls leave the log, the pending ones go to SQLite
                atexit.register(self.flush)
            self._pid = pid

    # -- the serving side ------------------------------------------------------------------

    def record(self, origin: str, calls: Sequence[tuple[str, bytes]]) -> list[int]:
        """Append one request's calls to this worker's log, owned by it; returns their
        keys for ``done`` and ``failed`` (below 0: not row ids)."""
        self._register()
        with self._lock:
            self._requests += 1
            request = f"{self.worker}:{self._requests}"
        now = time.time()
        keys = [-next(self._keys) for _ in calls]
        with self._state:
            for key, (path, payload) in zip(keys, calls, strict=True):
                self._unmoved[key] = (request, origin, path, payload, self.worker, now)
        assert self._log is not None  # _register made it
        try:
            self._log.append(journal_log.encode(request, origin, now, calls, keys), keys)
        except BaseException:  # not recorded (a full disk): not pending either
            with self._state:
                for key in keys:
                    self._unmoved.pop(key, None)
            raise
        return keys

    def _insert(self, db: sqlite3.Connection, rows: Sequence[tuple]) -> list[int]:
        """Insert ``rows`` (request, origin, path, payload, owner, created); their ids.
        More than ``INSERT_ROWS`` take several statements: the caller's transaction."""
        ids: list[int] = []
        for i in range(0, len(rows), INSERT_ROWS):
            chunk = rows[i : i + INSERT_ROWS]
            cur = db.execute(
                "INSERT INTO calls (request, origin, path, payload, owner, created) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [value for row in chunk for value in row],
            )
            # one statement holding the write lock numbers its rows one after another
            last = cur.lastrowid
            ids += range(last - len(chunk) + 1, last + 1)
        return ids

    def move(self, everything: bool = False) -> int:
        """Move the calls still pending in this worker's log files that are due (started
        a turn ago; ``everything``: all, at a drain) into SQLite, then remove the files.
        The sweeper's, every ``MOVE_EVERY``; returns how many calls moved."""
        log_ = self._log
        if log_ is None or log_.pid != os.getpid():
            return 0
        due = log_.turn(everything)
        if not due:
            return 0
        with self._state:
            # a file holding a call whose row failed() is inserting stays until it is in
            busy = [i for i, (_, keys) in enumerate(due) if not self._inserting.isdisjoint(keys)]
            if busy:
                log_.keep([due[i] for i in busy])
                due = [f for i, f in enumerate(due) if i not in busy]
            keys = [key for _, keys in due for key in keys if key in self._unmoved]
            rows = [self._unmoved.pop(key) for key in keys]
            self._moving.update(keys)
        names = [(path.name,) for path, _ in due]
        ids: list[int] = []
        try:
            if rows:
                db = self._db()
                with self._writing:
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        inserted = self._insert(db, rows)
                        db.executemany("INSERT OR IGNORE INTO moved_logs VALUES (?)", names)
                        db.execute("COMMIT")
                    except BaseException:
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        raise
                    ids = inserted  # only once committed: rolled back, these ids are not theirs
        finally:
            ended = []
            with self._state:
                for key, row in zip(keys, ids or rows, strict=True):
                    self._moving.discard(key)
                    if not ids:  # not moved: the files stay, the next turn tries again
                        if key not in self._ended_moving:
                            self._unmoved[key] = row
                    elif key in self._ended_moving:
                        ended.append(row)
                    else:
                        self._rows[key] = row
                    self._ended_moving.discard(key)
                self._state.notify_all()
            if rows and not ids:
                log_.keep(due)
        self._remove([path for path, _ in due], marked=bool(rows))
        for row_id in ended:
            self._later(self._done, row_id)
        return len(rows)

    def _remove(self, paths: list[Path], marked: bool = True) -> None:
        """Remove log files whose calls are in SQLite (committed), then their marks. A
        failure is logged, never raised: the calls are safe, and a mark left behind
        keeps its file from being read again until a claim tidies it."""
        gone: list[tuple[str]] = []
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                log.exception("deferred journal %s: removing %s failed", self.path, path)
            else:
                gone.append((path.name,))
        if marked and gone:
            try:
                self._unmark(gone)
            except Exception:
                log.exception("deferred journal %s: removing moved log marks failed", self.path)

    def _unmark(self, names: list[tuple[str]]) -> None:
        with self._writing:
            self._db().executemany("DELETE FROM moved_logs WHERE name = ?", names)

    def done(self, key: int) -> None:
        """The call (a key from ``record``, or a claimed row's id) ended: said so in the
        log, or its row deleted, within ``DONE_DELAY`` s (with the others that ended
        meanwhile: a write per call would contend with the serving threads; a call
        that ended that recently may run again after a kill)."""
        if key < 0:
            with self._state:
                if self._unmoved.pop(key, None) is not None:
                    self._later(self._ended, key)  # still only in the log
                    return
                if key in self._moving:
                    self._ended_moving.add(key)
                    return
                key = self._rows.pop(key, 0)
            if not key:
                return
        self._later(self._done, key)

    def _later(self, pending: list[int], value: int) -> None:
        """Queue an end for the flusher thread (started in each process that needs one)."""
        with self._done_lock:
            if self._flusher_pid != os.getpid():
                self._flusher_pid = os.getpid()
                self._done.clear()  # a forked child: the parent forgets its own
                self._ended.clear()
                threading.Thread(target=self._flush_loop, name="journal-done", daemon=True).start()
            pending.append(value)
            if len(self._done) + len(self._ended) == 1:
                self._done_lock.notify()

    def flush(self, _seconds_left: float = 0.0) -> int:
        """A drain hook, after the executor's drain (and at exit): move what is left in
        the log into SQLite for the next worker, and delete the rows of calls that ended."""
        try:
            self.move(everything=True)
            with self._done_lock:
                self._ended.clear()  # their log files are gone
        finally:
            self._delete_ended()
        return 0

    def _delete_ended(self) -> None:
        with self._done_lock:
            ids, self._done = self._done, []
            keys, self._ended = self._ended, []
        log_ = self._log
        if keys and log_ is not None and log_.pid == os.getpid():
            log_.append(journal_log.encode_ended(keys), ())
        for i in range(0, len(ids), INSERT_ROWS):
            chunk = ids[i : i + INSERT_ROWS]
            marks = ", ".join("?" * len(chunk))
            with self._writing:
                self._db().execute(f"DELETE FROM calls WHERE id IN ({marks})", chunk)

    def _flush_loop(self) -> None:
        background()
        while True:
            with self._done_lock:
                while not self._done and not self._ended:
                    self._done_lock.wait()
            time.sleep(DONE_DELAY)  # let the calls ending meanwhile join this statement
            try:
                self._delete_ended()
            except Exception:
                log.exception("deferred journal %s: recording ended calls failed", self.path)

    def failed(self, key: int, error: str) -> float | None:
        """The call (a key from ``record``, or a claimed row's id) raised: free it for a
        retry later, or mark it dead. Returns the retry delay in seconds, or None when
        it is now dead."""
        call_id = self._row_id(key) if key < 0 else key
        if call_id is None:
            return None
        with self._writing:
            return self._failed(self._db(), call_id, error)

    def _row_id(self, key: int) -> int | None:
        """The row of a recorded call, inserted now if it is still only in the log (whose
        file stays until the row is committed: ``move`` skips it meanwhile)."""
        with self._state:
            while key in self._moving:
                self._state.wait()
            row_id = self._rows.pop(key, None)
            row = self._unmoved.pop(key, None)
            if row is not None:
                self._inserting.add(key)
        if row_id is None and row is not None:
            try:
                with self._writing:
                    [row_id] = self._insert(self._db(), [row])
            except BaseException:  # still only in the log: a move takes it
                with self._state:
                    self._unmoved[key] = row
                raise
            finally:
                with self._state:
                    self._inserting.discard(key)
        return row_id

    def _failed(self, db: sqlite3.Connection, call_id: int, error: str) -> float | None:
        row = db.execute("SELECT attempts FROM calls WHERE id = ?", (call_id,)).fetchone()
        if row is None:
            return None
        attempts = row[0]
        if attempts >= self.attempts:
            db.execute(
                "UPDATE calls SET state = 'dead', owner = NULL, error = ? WHERE id = ?",
                (error, call_id),
            )
            return None
        delay = self.retry * 2 ** (attempts - 1)
        db.execute(
            "UPDATE calls SET owner = NULL, ready_at = ?, error = ? WHERE id = ?",
            (time.time() + delay, error, call_id),
        )
        return delay

    # -- taking over ---------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Copy the WAL into the database when no reader holds it (the sweeper, with
        each heartbeat: the serving threads never pay for it)."""
        self._db().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def heartbeat(self) -> None:
        """Say this worker is alive; re-enter it if another took it for gone."""
        self._register()
        with self._writing:
            cur = self._db().execute(
                "UPDATE workers SET heartbeat = ? WHERE id = ?", (time.time(), self.worker)
            )
        if cur.rowcount == 0:  # taken for gone (a stall past the lease): enter again
            self._pid = 0
            self._register()

    def claim(self, limit: int = CLAIM_ROWS) -> list[list[Row]]:
        """Take the calls of gone workers and the calls due for a retry; return them
        grouped by request, oldest request first, each in its request's order.

        A claim counts as an attempt: a call that kills its worker every time (a
        segfault, an OOM) is declared dead after ``attempts`` claims like any other.
        """
        self._register()
        if not self._claimable(self._db(), time.time()):
            return []  # the usual case: no write lock taken, serving threads never wait
        with self._writing:
            claimed, worn, read = self._take(self._db(), time.time(), limit)
        self._remove(read)  # committed: what fails here must not keep the calls from running
        for row in worn:
            log.error(
                "deferred %s dead after %d attempts (request %s): %s",
                row.path,
                self.attempts,
                row.origin,
                row.error or "its worker died while it ran",
            )
        groups: dict[str, list[Row]] = {}
        for row in sorted(claimed, key=lambda r: r.id):
            if row.attempts <= self.attempts:
                groups.setdefault(row.request, []).append(row)
        return list(groups.values())

    def _claimable(self, db: sqlite3.Connection, now: float) -> bool:
        """Whether a claim would find anything: calls, gone workers to forget, log files
        of workers unknown (a read: no lock)."""
        workers = {wid: row for wid, *row in db.execute("SELECT * FROM workers")}
        if any(wid != self.worker and _gone(*row, now) for wid, row in workers.items()):
            return True
        present = journal_log.files(self.logs)
        if any(journal_log.owner(path) not in (*workers, self.worker) for path in present):
            return True
        if _moved(db) - {path.name for path in present}:
            return True  # a mark whose file is gone (its removal failed): to tidy
        found = db.execute(
            "SELECT 1 FROM calls WHERE state = 'pending' AND ready_at <= ? AND (owner IS NULL"
            " OR owner NOT IN (SELECT id FROM workers)) LIMIT 1",
            (now,),
        ).fetchone()
        return found is not None

    def _take(
        self, db: sqlite3.Connection, now: float, limit: int
    ) -> tuple[list[Row], list[Row], list[Path]]:
        """In one transaction: read the log files of gone workers, forget them, own their
        calls and the calls due; mark dead those past their attempts. Returns (claimed,
        worn out, log files read or already moved, to remove)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            workers = {wid: row for wid, *row in db.execute("SELECT * FROM workers")}
            gone = [w for w, row in workers.items() if w != self.worker and _gone(*row, now)]
            read = self._read_logs(db, {w for w in workers if w not in gone} | {self.worker})
            db.executemany("DELETE FROM workers WHERE id = ?", [(w,) for w in gone])
            free = (
                "state = 'pending' AND ready_at <= :now AND (owner IS NULL"
                " OR owner NOT IN (SELECT id FROM workers))"
            )
            rows = db.execute(
                f"UPDATE calls SET owner = :me, attempts = attempts + 1 WHERE {free}"
                f" AND request IN (SELECT request FROM calls WHERE {free} ORDER BY id LIMIT :n)"
                " RETURNING id, request, origin, path, payload, state, attempts, created, error",
                {"me": self.worker, "now": now, "n": limit},
            ).fetchall()
            claimed = [Row(*r) for r in rows]
            worn = [r for r in claimed if r.attempts > self.attempts]
            db.executemany(
                "UPDATE calls SET state = 'dead', owner = NULL, attempts = attempts - 1,"
                " error = coalesce(error, 'its worker died while it ran') WHERE id = ?",
                [(r.id,) for r in worn],
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return claimed, worn, read

    def _read_logs(self, db: sqlite3.Connection, alive: set[str]) -> list[Path]:
        """(In ``_take``'s transaction.) Insert the calls not said to have ended in the
        log files of workers not ``alive``, owned by their writer (gone: the claim takes
        them). Returns those files and the ones already moved, to remove once committed."""
        moved = _moved(db)
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
                (request, origin, call, payload, writer, created)
                for request, origin, created, call, payload in calls
            ]
            self._insert(db, rows)
            marks = [(path.name,) for path in paths]
            db.executemany("INSERT OR IGNORE INTO moved_logs VALUES (?)", marks)
            done += paths
        return done

    # -- looking and tidying (status page, CLI) --------------------------------------------

    def counts(self) -> dict[str, int]:
        """Calls pending (in any worker, or waiting for a retry) and dead, journal-wide."""
        db = self._db()
        found = dict(db.execute("SELECT state, count(*) FROM calls GROUP BY state"))
        moved = _moved(db)
        logged = 0
        mine = {self.worker} if self.worker else set()
        for journal in list(_journals):  # this process's calls still only in its logs (two
            if journal.logs == self.logs and journal.worker in mine:  # middlewares: two)
                with journal._state:
                    logged += len(journal._unmoved) + len(journal._moving)
        others = journal_log.by_owner(
            path
            for path in journal_log.files(self.logs)
            if path.name not in moved and journal_log.owner(path) not in mine
        )
        for paths in others.values():  # recorded in the last half second, or a gone worker's
            with contextlib.suppress(OSError):  # unreadable: the claims' log says so
                logged += sum(1 for _ in journal_log.pending(paths, warn=False))
        pending = found.get("pending", 0) + logged
        return {"journal_pending": pending, "journal_dead": found.get("dead", 0)}

    def rows(self, state: str | None = None) -> list[Row]:
        where, params = ("WHERE state = ?", (state,)) if state else ("", ())
        return [
            Row(*r)
            for r in self._db().execute(
                "SELECT id, request, origin, path, payload, state, attempts, created, error"
                f" FROM calls {where} ORDER BY id",
                params,
            )
        ]

    def retry_dead(self, ids: Iterable[int] | None = None) -> int:
        """Give dead calls (these, or all) a fresh set of attempts; a worker claims them."""
        return self._dead_update(
            "UPDATE calls SET state = 'pending', owner = NULL, attempts = 0, ready_at = 0"
            " WHERE state = 'dead'",
            ids,
        )

    def purge_dead(self, ids: Iterable[int] | None = None) -> int:
        """Delete dead calls (these, or all); returns how many."""
        return self._dead_update("DELETE FROM calls WHERE state = 'dead'", ids)

    def _dead_update(self, sql: str, ids: Iterable[int] | None) -> int:
        db = self._db()
        with self._writing:
            if ids is None:
                return db.execute(sql).rowcount
            return sum(db.execute(sql + " AND id = ?", (i,)).rowcount for i in ids)


class _Owned:
    """One thread's connection, closed when that thread ends or the journal goes (an
    unclosed connection warns when collected, from Python 3.13). One inherited across
    a fork is dropped unclosed: closing it could tidy the WAL under the parent."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db: sqlite3.Connection | None = db
        self.pid = os.getpid()

    def __del__(self) -> None:
        if self.db is not None and self.pid == os.getpid():
            with contextlib.suppress(Exception):
                self.db.close()


def _moved(db: sqlite3.Connection) -> set[str]:
    """The log files marked as moved into SQLite already."""
    return {name for (name,) in db.execute("SELECT name FROM moved_logs")}


def _gone(host: str, pid: int, heartbeat: float, now: float) -> bool:
    """A worker is gone when its lease ran out, or (on this host) its pid is not alive,
    or is this very process under an earlier id (an exec in place keeps the pid)."""
    if now - heartbeat > LEASE:
        return True
    if host != socket.gethostname():
        return False
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
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


class Sweeper:
    """A worker's background thread: moves its log into SQLite, heartbeats, and hands
    claimed calls to ``run`` (one list of rows per request) while ``room()`` says the
    executor has space."""

    def __init__(
        self,
        journal: Journal,
        run: Callable[[list[Row]], None],
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        self.journal = journal
        self.run = run
        self.room = room
        self._pid = 0
        self._stop = threading.Event()  # no more claims
        self._end = threading.Event()  # no more moves either: the thread ends

    def start(self) -> None:
        """Start (once per process: again in a forked child)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._end = threading.Event()
        threading.Thread(target=self._loop, name="deferred-journal", daemon=True).start()

    def stop(self, _seconds_left: float = 0.0) -> int:
        """Stop claiming (a drain hook: abandons nothing, the journal keeps it all). The
        thread goes on moving the log and beating while the process lives: a call that
        ends during the drain must leave the log, or a kill then would run it again."""
        self._stop.set()
        return 0

    def end(self) -> None:
        """End the thread (a test, or an app done with this journal)."""
        self._stop.set()
        self._end.set()

    def _loop(self) -> None:
        background()
        beat = looked = failed = 0.0
        while not self._end.is_set():
            try:
                self.journal.move()
            except Exception:  # the heartbeat goes on: others must not take this worker's
                if time.monotonic() - failed >= HEARTBEAT:  # once a beat: a full disk
                    failed = time.monotonic()  # is no place for 4 tracebacks a second
                    log.exception("deferred journal %s: moving the log failed", self.journal.path)
            try:
                now = time.monotonic()
                if now - beat >= HEARTBEAT:
                    self.journal.heartbeat()
                    self.journal.checkpoint()
                    beat = now
                if self._stop.is_set() or now - looked < POLL:
                    continue
                looked = now
                while self.room() and not self._stop.is_set():
                    groups = self.journal.claim()
                    for rows in groups:
                        self.run(rows)
                    if not groups:
                        break
            except Exception:
                log.exception("deferred journal %s: claiming failed", self.journal.path)
            finally:
                self._end.wait(journal_log.MOVE_EVERY)
