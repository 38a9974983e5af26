"""The pool's scoreboard: one small shared-memory slot per worker, in a folder.

Each worker maps its own file ``<pid>.slot`` and rewrites it as requests start
and end (and its deferred counters change), so whichever worker answers the
status page reads every slot and reports the whole pool, as PHP-FPM does.
Slots of workers that are gone are skipped and removed. ``pool.json`` keeps
what outlives one worker: the pool's start and its high-water marks.

``accepted`` counts requests, as PHP-FPM's ``accepted conn`` does (monitors turn
it into requests per second); ``connections`` counts the connections accepted.
A worker may run several requests at once (``--threads``, PHP-style requests
after their finish): the slot is busy while any runs, since the oldest began.

Where the folder is, unless ``--scoreboard`` says: workers that share an
inherited listening socket (supervisor's ``[fcgi-program]``) share one, named
after that socket, so the pool shows without a flag; a worker alone on a
socket it bound itself gets a private one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FIELDS = (
    ("pid", "i"),
    ("start_time", "d"),
    ("accepted", "Q"),
    ("requests", "Q"),
    ("busy_since", "d"),  # when the oldest running request began; 0 when idle
    ("last_duration", "d"),
    ("method", "8s"),
    ("uri", "200s"),
    ("content_length", "q"),
    ("slow", "Q"),
    ("deferred_queued", "Q"),
    ("deferred_running", "Q"),
    ("deferred_done", "Q"),
    ("deferred_failed", "Q"),
    ("deferred_abandoned", "Q"),
    ("last_deferred", "d"),
    ("connections", "Q"),
    ("active", "Q"),  # requests running now
    ("deferred_journal_pending", "Q"),  # journal-wide (every worker sees the same file)
    ("deferred_journal_dead", "Q"),
)
SLOT = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))
NAMES = [name for name, _ in FIELDS]
# the deferred-work hook's keys kept in a slot (the journal's only when it is on)
COUNTERS = ("queued", "running", "done", "failed", "abandoned", "journal_pending", "journal_dead")
_TEXT = {"method", "uri"}
_POOL_LOCK = threading.Lock()  # POSIX locks do not exclude threads of one process


class Scoreboard:
    """This worker's slot, and reading everyone's."""

    def __init__(self, directory: str | Path, private: bool = False, shared: bool = False) -> None:
        self.private = private  # ours alone: removed with the worker
        self.shared = shared  # named after the socket: removed by the pool's last worker
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.dir / f"{os.getpid()}.slot"
        if not [s for s in self.read_all(sample=False) if s["pid"] != os.getpid()]:
            # the first worker of a new pool: its start time and marks begin now
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "pool.json").unlink()
        try:
            self.path.write_bytes(bytes(SLOT.size))
        except FileNotFoundError:  # the pool's last worker removed the folder meanwhile
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.write_bytes(bytes(SLOT.size))
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), SLOT.size)
        self._lock = threading.Lock()  # request threads and the refresher write the slot
        self._running: dict[object, tuple[float, str, str, int]] = {}
        self._by_thread: dict[int, object] = {}  # the request each thread runs now
        self.values: dict[str, Any] = dict.fromkeys(NAMES, 0)
        self.values.update(pid=os.getpid(), start_time=time.time(), method=b"", uri=b"")
        self._write()
        self._update_pool(active=0)

    def _write(self) -> None:
        SLOT.pack_into(self._map, 0, *self.values.values())

    @classmethod
    def for_socket(cls, directory: str, sock: Any, inherited: bool) -> Scoreboard:
        """``directory`` if given; else shared by the workers of an inherited socket, else
        private to this worker (see the module's docstring)."""
        if directory:
            return cls(directory)
        if inherited:
            st = os.fstat(sock.fileno())
            if stat.S_ISSOCK(st.st_mode):
                name = f"fcgi-scoreboard-{os.geteuid()}-{st.st_dev}-{st.st_ino}"
                return cls(os.path.join(runtime_dir(), name), shared=True)
        return cls(tempfile.mkdtemp(prefix="fcgi-status-"), private=True)

    def accepted(self) -> None:
        """A connection was accepted (PHP-FPM's "accepted conn" counts requests instead)."""
        with self._lock:
            self.values["connections"] += 1
            self._write()

    def request_started(self, method: str, uri: str, content_length: str) -> object:
        """A request began; returns the token ``request_ended`` takes (default: the
        calling thread, which runs the request to its end)."""
        token = object()
        now = time.time()
        length = int(content_length) if content_length.isdigit() else 0
        with self._lock:
            v = self.values
            v["accepted"] += 1
            self._running[token] = (now, method, uri, length)
            self._by_thread[threading.get_ident()] = token
            v["active"] = len(self._running)
            v["busy_since"] = v["busy_since"] or now
            v["method"] = method.encode("latin-1", "replace")[:8]
            v["uri"] = uri.encode("latin-1", "replace")[:200]
            v["content_length"] = length
            self._write()
        return token

    def request_ended(self, token: object = None) -> None:
        now = time.time()
        with self._lock:
            v = self.values
            if token is None:
                token = self._by_thread.pop(threading.get_ident(), None)
            began = self._running.pop(token, None)
            v["requests"] += 1
            if began is not None:
                v["last_duration"] = now - began[0]
            v["active"] = len(self._running)
            # still busy with the others: since the oldest of them began
            v["busy_since"] = min((r[0] for r in self._running.values()), default=0.0)
            self._write()

    def set_counters(self, slow: int, deferred: dict[str, Any] | None) -> None:
        with self._lock:
            v = self.values
            v["slow"] = slow
            if deferred:
                for key in COUNTERS:
                    v["deferred_" + key] = deferred.get(key, 0)
                v["last_deferred"] = deferred.get("last_duration", 0.0)
            self._write()

    def close(self) -> None:
        self._map.close()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.private:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.shared and not self.read_all(sample=False):
            # the pool's last worker; a worker starting meanwhile recreates the folder
            with contextlib.suppress(OSError):
                (self.dir / "pool.json").unlink()
                self.dir.rmdir()

    # -- reading the pool ------------------------------------------------------------

    def read_all(self, sample: bool = True) -> list[dict[str, Any]]:
        """Every live worker's slot; the slots of dead workers are removed. With ``sample``,
        the pool's high-water marks take in how many are busy now."""
        slots = []
        for path in sorted(self.dir.glob("*.slot")):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if len(data) != SLOT.size:
                continue
            slot = dict(zip(NAMES, SLOT.unpack(data), strict=True))
            if not _alive(slot["pid"]):
                with contextlib.suppress(OSError):  # gone already, or another user's
                    path.unlink()
                continue
            for key in _TEXT:
                slot[key] = slot[key].rstrip(b"\0").decode("latin-1")
            slots.append(slot)
        if sample:
            self._update_pool(active=sum(1 for s in slots if s["busy_since"]), total=len(slots))
        return slots

    def pool(self) -> dict[str, Any]:
        return self._update_pool()

    @contextlib.contextmanager
    def _locked_pool(self) -> Iterator[IO[str]]:
        """pool.json, open and locked against this pool's other workers and this one's
        other threads. A POSIX record lock (``lockf``), not ``flock``: a process forked
        meanwhile (the deferred-work helper, an app's own child) does not inherit it,
        where an inherited ``flock`` stayed held by the child and hung this worker."""
        with _POOL_LOCK, open(self.dir / "pool.json", "a+", encoding="utf-8") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            yield f

    def _update_pool(self, active: int = 0, total: int = 0) -> dict[str, Any]:
        """Read and update pool.json under a lock: start time and high-water marks."""
        with self._locked_pool() as f:
            f.seek(0)
            try:
                pool = json.loads(f.read() or "{}")
            except ValueError:
                pool = {}
            pool.setdefault("start_time", time.time())
            pool["max_active"] = max(pool.get("max_active", 0), active)
            if total and active >= total:
                pool["max_children_reached"] = pool.get("max_children_reached", 0) + 1
            pool.setdefault("max_children_reached", 0)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(pool))
        return pool


def runtime_dir() -> str:
    """Shared memory (/dev/shm) where there is some, else the temporary folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
