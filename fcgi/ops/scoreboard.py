"""The pool's scoreboard: one small shared-memory slot per worker, in a folder.

Each worker maps its own file ``<pid>.slot`` and rewrites it as requests start
and end (and its deferred counters change), so whichever worker answers the
status page reads every slot and reports the whole pool, as PHP-FPM does.
Slots of workers that are gone are skipped and removed. ``pool.json`` keeps
what outlives one worker: the pool's start, its high-water marks, and the counts
of workers that went (folded in when they close their slot).

``max children reached`` counts what PHP-FPM counts: requests that found every
worker busy (their own with every thread taken, so they waited, and every other
worker's too, read from the others' slots, mapped once and read without a lock).

Beside each slot, ``<pid>.reload`` holds the outcome of the worker's last reload
(checking, refused with the new code's traceback, or reloaded), so ``fcgi-finish
reload`` can tell what each worker did; it lives as long as the worker (its pid).

``accepted`` counts requests, as PHP-FPM's ``accepted conn`` does (monitors turn
it into requests per second).
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
    ("active", "Q"),  # requests running now
    ("deferred_journal_pending", "Q"),  # journal-wide (every worker sees the same file)
    ("deferred_journal_dead", "Q"),
    ("threads", "Q"),  # requests it runs at once: busy when ``active`` reaches it
    ("children_reached", "Q"),  # requests that found every worker busy
    ("reloads", "Q"),  # reloads into new code, over the worker's life
    ("reloads_refused", "Q"),  # reloads refused: the new code failed its check
)
SLOT = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))
NAMES = [name for name, _ in FIELDS]
# the deferred-work hook's keys kept in a slot (the journal's only when it is on)
COUNTERS = ("queued", "running", "done", "failed", "abandoned", "journal_pending", "journal_dead")
_TEXT = {"method", "uri"}


def _offset(name: str) -> int:
    return struct.calcsize("<" + "".join(fmt for _, fmt in FIELDS[: NAMES.index(name)]))


_ACTIVE_AT, _THREADS_AT = _offset("active"), _offset("threads")
POOL = "pool.json"  # what outlives one worker: the pool's start, marks, counts
POOL_LOCK = "pool.lock"  # the lock its writers take (pool.json is renamed over, not locked)
_POOL_LOCK = threading.Lock()  # POSIX locks do not exclude threads of one process


class Scoreboard:
    """This worker's slot, and reading everyone's."""

    def __init__(
        self,
        directory: str | Path,
        private: bool = False,
        shared: bool = False,
        threads: int = 1,
        reloaded: bool = False,
    ) -> None:
        self.private = private  # ours alone: removed with the worker
        self.shared = shared  # named after the socket: removed by the pool's last worker
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.dir / f"{os.getpid()}.slot"
        others = [s for s in self.read_all(sample=False) if s["pid"] != os.getpid()]
        if not others and not reloaded:
            # the first worker of a new pool (not this one's reload): its start time and
            # marks begin now
            with contextlib.suppress(FileNotFoundError):
                (self.dir / POOL).unlink()
        try:
            self.path.write_bytes(bytes(SLOT.size))
        except FileNotFoundError:  # the pool's last worker removed the folder meanwhile
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.write_bytes(bytes(SLOT.size))
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), SLOT.size)
        self._lock = threading.Lock()  # request threads and the refresher write the slot
        self._reload_lock = threading.Lock()  # the reload record, read, changed, replaced
        self._running: dict[int, tuple[float, str, str, int]] = {}  # by thread
        self.values: dict[str, Any] = dict.fromkeys(NAMES, 0)
        self.values.update(pid=os.getpid(), start_time=time.time(), method=b"", uri=b"")
        self.values["threads"] = threads
        self._peers: dict[tuple[Path, int], tuple[IO[bytes], mmap.mmap]] = {}  # the others'
        self.reload_path = self.dir / f"{os.getpid()}.reload"
        record = read_reload(self.dir, os.getpid())  # this pid's earlier lives, if any
        if record:
            self.values["reloads"] = record["reloads"]
            self.values["reloads_refused"] = record["refused"]
        self._write()
        self._update_pool(active=0)

    def _write(self) -> None:
        SLOT.pack_into(self._map, 0, *self.values.values())

    @classmethod
    def for_socket(
        cls,
        directory: str,
        sock: Any,
        inherited: bool,
        threads: int = 1,
        reloaded: str | None = None,
    ) -> Scoreboard:
        """``directory`` if given; else shared by the workers of an inherited socket, else
        private to this worker (see the module's docstring). ``reloaded``: this process
        reloaded in place, so the pool goes on (its start, marks and counts are kept), and
        it is the private folder the previous interpreter kept, if any."""
        going_on = reloaded is not None
        folder = pool_folder(directory, sock, inherited)
        if folder is not None:
            return cls(folder, shared=not directory, threads=threads, reloaded=going_on)
        if reloaded and os.path.isdir(reloaded):
            return cls(reloaded, private=True, threads=threads, reloaded=True)
        return cls(tempfile.mkdtemp(prefix="fcgi-status-"), private=True, threads=threads)

    def request_started(
        self, method: str, uri: str, content_length: str, waited: bool = False
    ) -> None:
        """A request began on this thread, which runs it to its end (``waited``: it found
        every thread of this worker taken)."""
        now = time.time()
        length = int(content_length) if content_length.isdigit() else 0
        with self._lock:
            v = self.values
            v["accepted"] += 1
            if waited and self._peers_busy():
                v["children_reached"] += 1
            self._running[threading.get_ident()] = (now, method, uri, length)
            v["active"] = len(self._running)
            v["busy_since"] = v["busy_since"] or now
            v["method"] = method.encode("latin-1", "replace")[:8]
            v["uri"] = uri.encode("latin-1", "replace")[:200]
            v["content_length"] = length
            self._write()

    def request_ended(self) -> None:
        now = time.time()
        with self._lock:
            v = self.values
            began = self._running.pop(threading.get_ident(), None)
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

    def _peers_busy(self) -> bool:
        """Whether every other worker has every thread taken, from their mapped slots
        (those the last ``read_all`` saw), under our lock; theirs is not taken, so a
        worker changing its slot meanwhile may be seen just before or just after."""
        for _file, peer in self._peers.values():
            (active,) = struct.unpack_from("<Q", peer, _ACTIVE_AT)
            (threads,) = struct.unpack_from("<Q", peer, _THREADS_AT)
            if active < max(threads, 1):
                return False
        return True

    def reload_outcome(self, state: str, detail: str = "") -> None:
        """Record this worker's reload: ``checking`` (a new attempt), ``refused`` (with
        the check's output) or ``reloaded`` (the new code serves)."""
        pid = os.getpid()
        # one writer at a time: a reloaded interpreter says "reloaded" from its main
        # thread while a SIGHUP held across the exec begins its check ("checking")
        with self._reload_lock:
            record = read_reload(self.dir, pid) or {"attempt": 0, "reloads": 0, "refused": 0}
            if state == "checking":
                record["attempt"] += 1
            elif state == "reloaded":
                record["reloads"] += 1
            elif state == "refused":
                record["refused"] += 1
            record.update(pid=pid, state=state, detail=detail[-20000:], time=time.time())
            tmp = self.reload_path.with_name(f"{pid}.reload.new")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, self.reload_path)
        with self._lock:
            self.values["reloads"] = record["reloads"]
            self.values["reloads_refused"] = record["refused"]
            self._write()

    def timed_out(self) -> None:
        """A request ran past --request-timeout: counted for the pool in pool.json, which
        outlives the reload that follows."""
        self._update_pool(timeouts=1)

    def close(self, reloading: bool = False) -> None:
        """Give the slot up; its counts that outlive it go into pool.json. Reloading, the
        folder (a private one too), the pool's figures and the reload record stay for the
        next interpreter of this process."""
        if self.values["children_reached"]:
            self._update_pool(reached=self.values["children_reached"])
        self._map_peers(set())
        self._map.close()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if reloading:
            return
        with contextlib.suppress(FileNotFoundError):
            self.reload_path.unlink()
        if self.private:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.shared and not self.read_all(sample=False):
            # the pool's last worker; a worker starting meanwhile recreates the folder
            with contextlib.suppress(OSError):
                (self.dir / POOL).unlink()
                (self.dir / POOL_LOCK).unlink()
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
                    path.with_suffix(".reload").unlink()
                continue
            for key in _TEXT:
                slot[key] = slot[key].rstrip(b"\0").decode("latin-1")
            slots.append(slot)
        if sample:
            self._update_pool(active=sum(1 for s in slots if s["busy_since"]))
            self._map_peers({self.dir / f"{s['pid']}.slot" for s in slots} - {self.path})
        return slots

    def _map_peers(self, paths: set[Path]) -> None:
        """Keep the other live workers' slots mapped, for ``_peers_busy``: keyed by file
        (path and inode), so a pid reused by a new worker is mapped anew. The files are
        opened outside the lock, which request threads take as they start."""
        wanted: dict[tuple[Path, int], None] = {}
        for path in paths:
            with contextlib.suppress(OSError):
                wanted[(path, path.stat().st_ino)] = None
        opened: dict[tuple[Path, int], tuple[IO[bytes], mmap.mmap]] = {}
        for key in wanted.keys() - self._peers.keys():
            try:
                peer_file = open(key[0], "rb")  # noqa: SIM115 - closed with the map
            except OSError:
                continue
            try:
                peer = mmap.mmap(peer_file.fileno(), SLOT.size, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # cut short: a worker of another version
                peer_file.close()
                continue
            opened[key] = (peer_file, peer)
        with self._lock:
            gone = [self._peers.pop(key) for key in self._peers.keys() - wanted.keys()]
            self._peers.update(opened)
        for peer_file, peer in gone:
            peer.close()
            peer_file.close()

    def pool(self) -> dict[str, Any]:
        """The pool's figures as pool.json has them, read without its lock: the status
        page reads them on whatever thread serves it (with --threads 1, the loop's), which
        must never wait for another worker holding the lock."""
        pool = {"start_time": self.values["start_time"], "max_active": 0}
        pool.update(max_children_reached=0, request_timeouts=0)
        pool.update(self._read_pool())
        return pool

    def _read_pool(self) -> dict[str, Any]:
        try:
            found = json.loads((self.dir / POOL).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    @contextlib.contextmanager
    def _locked_pool(self) -> Iterator[None]:
        """pool.json's lock (on ``pool.lock``), against this pool's other workers and this
        one's other threads. A POSIX record lock (``lockf``), not ``flock``: a process
        forked meanwhile (the deferred-work helper, an app's own child) does not inherit
        it, where an inherited ``flock`` stayed held by the child and hung this worker."""
        with _POOL_LOCK, open(self.dir / POOL_LOCK, "a", encoding="utf-8") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            yield

    def _update_pool(self, active: int = 0, reached: int = 0, timeouts: int = 0) -> dict[str, Any]:
        """Update pool.json under its lock: start time, high-water marks, the ``reached``
        count of a worker giving its slot up, request timeouts. Written whole to a new
        file and renamed over the old, so a reader without the lock never sees half."""
        with self._locked_pool():
            pool = self._read_pool()
            pool.setdefault("start_time", time.time())
            pool["max_active"] = max(pool.get("max_active", 0), active)
            # of workers gone; the live ones' are in their slots
            pool["max_children_reached"] = pool.get("max_children_reached", 0) + reached
            pool["request_timeouts"] = pool.get("request_timeouts", 0) + timeouts
            fresh = self.dir / f"{POOL}.{os.getpid()}"
            fresh.write_text(json.dumps(pool), encoding="utf-8")
            os.replace(fresh, self.dir / POOL)
        return pool


def read_reload(directory: str | Path, pid: int) -> dict[str, Any] | None:
    """The reload record of worker ``pid`` (see the module's docstring), if any."""
    try:
        return json.loads((Path(directory) / f"{pid}.reload").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def pool_folder(directory: str, sock: Any, inherited: bool) -> Path | None:
    """The folder the workers of one pool share: ``directory`` if given, else one named
    after an inherited listening socket; None for a worker alone on a socket it bound."""
    if directory:
        return Path(directory)
    if inherited:
        st = os.fstat(sock.fileno())
        if stat.S_ISSOCK(st.st_mode):
            name = f"fcgi-scoreboard-{os.geteuid()}-{st.st_dev}-{st.st_ino}"
            return Path(runtime_dir(), name)
    return None


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
