"""The deferred-work journal: calls written to SQLite before the visitor has the response.

One database file per app (the stack's default is ``STATE/lib/deferred.sqlite3``,
one state folder per app), shared by every worker of its pools. A request's calls
are appended to the worker's log file before the response is finished
(``journal.log``: one ``write``), moved into SQLite by the worker's sweeper if they
are still pending a ``MOVE_EVERY`` later, deleted once they end, and claimed by
another worker when theirs is gone: its pid no longer alive, or its heartbeat older
than ``LEASE`` seconds (its log files are read into SQLite first). So once the
visitor has the page, the calls run at least once even if the worker is SIGKILLed,
OOM-killed or crashes; only a call running at that moment (or ended in the
``DONE_DELAY`` before) may run twice.

Each call carries the app it belongs to (``app``: the middleware's ``DEFERRED_APP``,
else the worker's MODULE:CALLABLE and folder, else the file of the module that
built the middleware); a worker claims only its own app's calls, so two pools of
one app share a journal and two apps on one file never run, or burn the attempts
of, each other's calls.

Attempts count failures, not stops: a call that raised, or whose worker died while
it ran (``journal.board`` says which were running), has used one; a call that had
not started, or that a reload or graceful stop cut, goes back to pending as it
was. A failing call is retried (after ``retry`` seconds, doubling) until it has
failed ``attempts`` times; then it stays in the journal as dead, for
``python -m wsgi_app.journal`` to list, retry or purge.

The files are private to the workers' user: 0600 (SQLite gives its -wal and -shm
files the database's mode), folders 0700, whatever the umask; ``secure_delete`` is
on, so a deleted call's arguments do not linger in the file's free pages.

SQLite in WAL mode with ``synchronous=NORMAL``: a commit is a write to the WAL
file without fsync, which survives the death of the process (the kernel has the
bytes) but not of the machine (power loss may drop the last commits).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import pwd
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import wsgi_app.journal.board as journal_board
import wsgi_app.journal.log as journal_log

from ..runtime.cpus import background
from .board import Board
from .log import CallLog, Meta, make_private, private_file, private_folder
from .schema import COLUMNS, VERSION, Row, create, moved_logs
from .takeover import Takeover

log = logging.getLogger("wsgi_app.deferred")

HEARTBEAT = 5.0  # seconds between heartbeats (and between looks for orphaned calls: POLL)
POLL = 1.0  # seconds between looks for calls to claim
DONE_DELAY = 0.02  # seconds an ended call may wait before it is deleted, with others
INSERT_ROWS = 1000  # calls per INSERT statement (SQLite's limit on variables: 32766)
BOARD_SLOTS = 4096  # calls running at once that a death is counted against


WAL_WAIT = 30.0  # seconds a new journal's switch to WAL waits for the other workers


def _into_wal(db: sqlite3.Connection) -> None:
    """WAL mode, which a new file takes under an exclusive lock. Workers that start
    together race for it, and SQLite answers the losers "locked" at once: its busy wait
    could deadlock there. So each tries again until the winner is done (CI: a worker of
    a fresh stack exited with "database is locked")."""
    deadline = time.monotonic() + WAL_WAIT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class JournalError(Exception):
    """The journal cannot be used as set (a path the worker cannot write); the message
    names the path and the fix. ``setup_error``: a worker that loads the app prints it
    as one line and exits 2, as for its own options."""

    setup_error = True


# journal file -> (pid, worker id, board): one id per process and file, shared by every
# Journal object on it (two middlewares in one process must not take each other's calls).
_ids: dict[str, tuple[int, str, Board]] = {}
_ids_lock = threading.Lock()
# journal file -> the lock its writers in this process take: threads queue on it and
# wake at once, instead of meeting SQLite's busy handler, which sleeps 1 ms and more
_write_locks: dict[str, threading.Lock] = {}
# this process's Journal objects: counts() adds the calls only in the logs of them all
_journals: weakref.WeakSet[Journal] = weakref.WeakSet()
# this process's pid, kept current across forks: getpid() is a system call, and the
# board is touched at every call's start and end
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _write_lock(path: Path) -> threading.Lock:
    with _ids_lock:
        return _write_locks.setdefault(str(path.resolve()), threading.Lock())


class Journal(Takeover):
    """The SQLite store of deferred calls; safe to share between threads and processes.

    ``app`` is the app whose calls this worker records and claims; None (the CLI, a
    look from outside) sees every app's calls and claims none.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        attempts: int = 5,
        retry: float = 10.0,
        app: str | None = "",
        slots: int = BOARD_SLOTS,
    ):
        # absolute: each thread opens its own connection, and the app may change folder
        self.path = Path(os.path.abspath(path))
        self.attempts = attempts  # failures before a call is declared dead
        self.retry = retry  # seconds before the first retry; doubles each time
        self.app = app
        self.slots = slots  # calls running at once that the board keeps track of
        self._local = threading.local()
        self._pid = 0
        self.worker = ""
        self._board: Board | None = None
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
        self._unmoved: dict[int, tuple] = {}  # key: the row it becomes (see _insert)
        self._moving: set[int] = set()
        self._ended_moving: set[int] = set()
        self._inserting: set[int] = set()  # failing calls whose row failed() is inserting
        self._rows: dict[int, int] = {}
        _journals.add(self)
        try:
            self._create()
        except (OSError, sqlite3.Error) as exc:
            raise self._unusable(exc) from exc

    def _create(self) -> None:
        """Make the file (private) and its tables, or bring an older journal's up to date."""
        private_folder(self.path.parent, ours=False)
        if not self.path.exists():
            os.close(private_file(self.path, os.O_RDWR))  # SQLite's -wal and -shm copy its mode
        for suffix in ("", "-wal", "-shm"):  # an older journal's, made with the umask
            make_private(self.path.with_name(self.path.name + suffix), journal_log.FILE_MODE)
        db = self._db()
        db.execute("PRAGMA page_size=1024")  # a new file only: rows are small, so are commits
        _into_wal(db)
        if db.execute("PRAGMA user_version").fetchone()[0] >= VERSION:
            return  # the usual case: a look, no write
        with self._writing:
            db.execute("BEGIN IMMEDIATE")
            try:
                create(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _unusable(self, exc: BaseException) -> JournalError:
        """The error for a journal this process cannot write, naming the path and the fix."""
        user = _user_name(os.geteuid())
        return JournalError(
            f"deferred journal {self.path}: cannot write it ({type(exc).__name__}: {exc}); "
            f"the workers' user ({user}) must own it, its -wal and -shm files, "
            f"{self.logs.name}/ and the folder: chown -R {user} {self.path.parent}, or set "
            "DEFERRED_JOURNAL to a path that user can write"
        )

    # -- connections -------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: SQLite's may not cross it)."""
        owned = getattr(self._local, "owned", None)
        if owned is None or owned.pid != os.getpid():
            if owned is not None:  # the parent's, inherited: never closed here (see _Owned)
                owned.db = None
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA secure_delete=ON")  # deleted calls' arguments are zeroed
            # no checkpoint (its fsync) on a serving thread: the sweeper does them
            db.execute("PRAGMA wal_autocheckpoint=0")
            owned = self._local.owned = _Owned(db)
        return owned.db

    def close(self) -> None:
        """Close this thread's connection (a CLI run, a test); another call reopens it."""
        self._local.owned = None

    def join(self) -> None:
        """Enter this process as a worker of the journal now: a write, so a journal it
        cannot write fails here (``JournalError``), at start, not at each request."""
        try:
            self._register()
        except (OSError, sqlite3.Error) as exc:
            raise self._unusable(exc) from exc

    def _register(self) -> None:
        """Enter this process in ``workers`` (again after a fork or an exec)."""
        pid = _pid[0]
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
            fresh = known is None or known[0] != pid
            if not fresh:
                _, self.worker, self._board = known
            else:
                self.worker = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
            with self._writing:
                self._db().execute(
                    "INSERT OR REPLACE INTO workers (id, host, pid, heartbeat) VALUES (?, ?, ?, ?)",
                    (self.worker, socket.gethostname(), pid, time.time()),
                )
            if fresh:  # after the row: a board of a worker not in the table is tidied away
                private_folder(self.logs)
                self._board = Board(journal_board.path_for(self.logs, self.worker), self.slots)
                _ids[key] = (pid, self.worker, self._board)
            if self._log is None:
                self._log = CallLog(self.logs, self.worker)
                # an exit with no drain hook (gunicorn's drain() runs the executors only):
                # the ended calls leave the log, the board goes
                atexit.register(self.flush)
            self._pid = pid

    # -- the serving side ------------------------------------------------------------------

    def record(self, origin: str, calls: Sequence[tuple[str, bytes, Meta]]) -> list[int]:
        """Append one request's calls ``(path, payload, meta)`` to this worker's log, owned
        by it; returns their keys for ``done`` and ``failed`` (below 0: not row ids)."""
        self._register()
        with self._lock:
            self._requests += 1
            request = f"{self.worker}:{self._requests}"
        now = time.time()
        app = self.app or ""
        keys = [-next(self._keys) for _ in calls]
        owner = self.worker
        with self._state:
            for key, (path, payload, meta) in zip(keys, calls, strict=True):
                self._unmoved[key] = (request, origin, path, payload, owner, now, app, key, meta)
        assert self._log is not None  # _register made it
        try:
            self._log.append(journal_log.encode(request, origin, now, app, calls, keys), keys)
        except BaseException:  # not recorded (a full disk): not pending either
            with self._state:
                for key in keys:
                    self._unmoved.pop(key, None)
            raise
        return keys

    def running(self, key: int) -> int:
        """The call ``key`` (or row id) starts: a slot of the board, for ``stopped``."""
        board = self._board
        return board.mark(key) if board is not None and self._pid == _pid[0] else -1

    def stopped(self, slot: int) -> None:
        """The call in ``slot`` ended, however it did."""
        board = self._board
        if board is not None and self._pid == _pid[0]:
            board.clear(slot)

    def _insert(self, db: sqlite3.Connection, rows: Sequence[tuple]) -> list[int]:
        """Insert ``rows`` (request, origin, path, payload, owner, created, app, log key,
        meta); their ids. More than ``INSERT_ROWS`` take several statements: the caller's
        transaction."""
        ids: list[int] = []
        for i in range(0, len(rows), INSERT_ROWS):
            chunk = rows[i : i + INSERT_ROWS]
            cur = db.execute(
                "INSERT INTO calls (request, origin, path, payload, owner, created, app, log_key,"
                " meta) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [
                    value
                    for *row, meta in chunk
                    for value in (*row, None if meta is None else json.dumps(meta))
                ],
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
            if self._flusher_pid != _pid[0]:
                self._flusher_pid = _pid[0]
                self._done.clear()  # a forked child: the parent forgets its own
                self._ended.clear()
                threading.Thread(target=self._flush_loop, name="journal-done", daemon=True).start()
            pending.append(value)
            if len(self._done) + len(self._ended) == 1:
                self._done_lock.notify()

    def flush(self, _seconds_left: float = 0.0) -> int:
        """A drain hook, after the executor's drain (and at exit): say in the log which
        calls ended, delete the rows of those in SQLite, and remove the board. What is
        still pending stays where it is, the log or SQLite, for the next worker (which
        reads a gone worker's log as it would after a kill); nothing that runs now
        counts as having died with the worker."""
        try:
            self._delete_ended()
        finally:
            board = self._board
            if board is not None and self._pid == os.getpid():
                board.close()
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
        """(Under the write lock.) One more failure: a retry later, or dead."""
        row = db.execute("SELECT attempts FROM calls WHERE id = ?", (call_id,)).fetchone()
        if row is None:
            return None
        failures = row[0] + 1
        if failures >= self.attempts:
            db.execute(
                "UPDATE calls SET state = 'dead', owner = NULL, attempts = ?, error = ?"
                " WHERE id = ?",
                (failures, error, call_id),
            )
            return None
        delay = self.retry * 2 ** (failures - 1)
        db.execute(
            "UPDATE calls SET owner = NULL, attempts = ?, ready_at = ?, error = ? WHERE id = ?",
            (failures, time.time() + delay, error, call_id),
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

    # -- looking and tidying (status page, CLI) --------------------------------------------

    def counts(self) -> dict[str, int]:
        """This app's calls (every app's, for a journal opened for all) pending in any
        worker, waiting for a retry, or dead."""
        db = self._db()
        where, params = ("", ()) if self.app is None else ("WHERE app = ?", (self.app,))
        found = dict(
            db.execute(f"SELECT state, count(*) FROM calls {where} GROUP BY state", params)
        )
        moved = moved_logs(db)
        logged = 0
        mine = {self.worker} if self.worker else set()
        for journal in list(_journals):  # this process's calls still only in its logs (two
            same = journal.logs == self.logs and journal.worker in mine  # middlewares: two)
            if same and (self.app is None or journal.app == self.app):
                with journal._state:
                    logged += len(journal._unmoved) + len(journal._moving)
        others = journal_log.by_owner(
            path
            for path in journal_log.files(self.logs)
            if path.name not in moved and journal_log.owner(path) not in mine
        )
        for paths in others.values():  # recorded in the last half second, or a gone worker's
            with contextlib.suppress(OSError):  # unreadable: the claims' log says so
                logged += sum(
                    1
                    for call in journal_log.pending(paths, warn=False)
                    if self.app is None or call.app == self.app
                )
        pending = found.get("pending", 0) + logged
        return {"journal_pending": pending, "journal_dead": found.get("dead", 0)}

    def rows(self, state: str | None = None) -> list[Row]:
        """The calls in SQLite (this app's, or every app's), oldest first."""
        where, params = [], []
        if state:
            where.append("state = ?")
            params.append(state)
        if self.app is not None:
            where.append("app = ?")
            params.append(self.app)
        sql = f"SELECT {COLUMNS} FROM calls"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [Row.of(r) for r in self._db().execute(sql + " ORDER BY id", params)]

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
        params: list[Any] = []
        if self.app is not None:
            sql += " AND app = ?"
            params.append(self.app)
        with self._writing:
            if ids is None:
                return db.execute(sql, params).rowcount
            return sum(db.execute(sql + " AND id = ?", (*params, i)).rowcount for i in ids)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


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
