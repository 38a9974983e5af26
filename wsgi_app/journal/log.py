"""The journal's append log: where a serving thread records a request's calls.

An SQLite ``INSERT`` on the serving thread cost the worker more than the calls' own
bookkeeping: a dozen system calls (file locks, WAL writes) and a large part of
SQLite's code through the CPU's caches, for every request that defers. A serving
thread appends one frame to its worker's log file instead: one ``write``, which
survives the process's death as a commit does (the page cache keeps it; a power
loss may drop it, as ``synchronous=NORMAL`` may drop a commit).

Each worker writes its own files, ``<worker id>.<n>.log`` in ``<journal>.logs/``.
Its sweeper starts a new file every ``MOVE_EVERY`` seconds and moves the calls of
the file before, those still waiting or running, into SQLite (``Journal.move``);
a call that ended by then never touches SQLite. A worker taking over the calls of
a dead one reads its files into SQLite first.

A frame is a header (length, CRC-32) and a pickle: ``("batch", request, origin,
created, app, [(path, payload, meta), ...], keys)`` for a request's calls (``app``
names the app they belong to; ``meta`` is a call's own metadata beside its
arguments, a dict or None), ``("ended", keys)`` for calls that ended since (written
every ``DONE_DELAY`` by the journal's flusher, so a taken-over log runs again only
what ended in the last moments). Reading skips what is not a whole frame (a write cut
short, a place left by a write the kill stopped while later ones went on) to the next
whole one: a frame is a call's only when its CRC and its pickle check.
Frames of the first version, ``("calls", ...)`` without app or metadata, are read
as the app "".

The files and their folder are private to the worker's user (0600, 0700), whatever
the umask: the arguments of deferred calls are often secrets (tokens, addresses).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import pickle
import re
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("wsgi_app.deferred")

MOVE_EVERY = 0.25  # seconds between new files; a call still running past one is moved
HEADER = struct.Struct("<II")  # length of the pickle, its CRC-32
_NONZERO = re.compile(rb"[^\x00]")
SUFFIX = ".log"

FILE_MODE = 0o600  # what the journal creates: private to the workers' user
FOLDER_MODE = 0o700

Meta = dict[str, Any] | None  # a call's own metadata, beside its arguments


class Logged(NamedTuple):
    """A call found in a log file, not said to have ended."""

    request: str
    origin: str
    created: float
    app: str
    path: str
    payload: bytes
    meta: Meta
    key: int  # the writer's key for it (below 0)


# the files' numbers, one sequence per process: two journals' logs (two middlewares on
# one file) share the worker id, never a file
_numbers = itertools.count(1)


def encode(
    request: str,
    origin: str,
    created: float,
    app: str,
    calls: Sequence[tuple[str, bytes, Meta]],
    keys: Sequence[int],
) -> bytes:
    return _frame(("batch", request, origin, created, app, calls, keys))


def encode_ended(keys: Sequence[int]) -> bytes:
    return _frame(("ended", list(keys)))


def _frame(value: tuple) -> bytes:
    body = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def pending(paths: Sequence[Path], warn: bool = True) -> Iterator[Logged]:
    """The calls in one worker's log files (in the order written) not said to have ended."""
    frames = [frame for path in paths for frame in read(path, warn)]
    ended = {key for frame in frames if frame[0] == "ended" for key in frame[1]}
    for frame in frames:
        if frame[0] == "batch":
            _, request, origin, created, app, calls, keys = frame
            for key, (path, payload, meta) in zip(keys, calls, strict=True):
                if key not in ended:
                    yield Logged(request, origin, created, app, path, payload, meta, key)


def read(path: Path, warn: bool = True) -> Iterator[tuple]:
    """The whole frames of a log file. A stretch that is not one (a write cut short, a
    place reserved by a write a kill stopped while later ones went on, zeros, damage)
    is skipped to the next whole frame (``warn``: say so; a file still written to may
    end in a frame half written)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    pos = 0
    while pos < len(data):
        frame, end = _frame_at(data, pos)
        if frame is not None:
            yield frame
            pos = end
            continue
        end = _next_frame(data, pos + 1)
        if warn:
            where = "at its end" if end == len(data) else f"at byte {pos}"
            log.warning(
                "deferred journal log %s: %d byte(s) %s cut short or damaged, %s",
                path,
                end - pos,
                where,
                "ignored" if end == len(data) else "skipped to the next whole frame",
            )
        pos = end


def _frame_at(data: bytes, pos: int) -> tuple[tuple | None, int]:
    """The frame starting at ``pos`` and where it ends, or None if none whole starts
    there (zeros too: an empty body's CRC is 0)."""
    if pos + HEADER.size > len(data):
        return None, pos
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if not length or end > len(data):
        return None, pos
    body = data[pos + HEADER.size : end]
    if zlib.crc32(body) != crc:
        return None, pos
    return _decoded(body), end


def _next_frame(data: bytes, pos: int) -> int:
    """Where the first whole frame at or after ``pos`` starts, else the end of ``data``.
    A frame's length is not 0, so one of its first four bytes is not: zeros (a crash's
    tail, a place never written) are passed over at the speed of a search."""
    while pos < len(data):
        nonzero = _NONZERO.search(data, pos)
        if nonzero is None:
            break
        first = nonzero.start()
        for start in range(max(pos, first - 3), first + 1):  # its low bytes may be zeros
            if _frame_at(data, start)[0] is not None:
                return start
        pos = first + 1
    return len(data)


def _decoded(body: bytes) -> tuple | None:
    """The frame in ``body`` (a first version's as a batch of the app ""), or None if
    it is not one (whatever its CRC says)."""
    try:
        frame = pickle.loads(body)
        if frame[0] == "ended" and len(frame) == 2:
            return frame if all(isinstance(key, int) for key in frame[1]) else None
        if frame[0] == "calls":  # the first version's
            _, request, origin, created, old, keys = frame
            frame = ("batch", request, origin, created, "", [(*c, None) for c in old], keys)
        kind, request, origin, created, app, calls, keys = frame
        if kind != "batch" or not all(isinstance(v, str) for v in (request, origin, app)):
            return None
        if not isinstance(created, float) or len(calls) != len(keys):
            return None
        for path, payload, meta in calls:
            if not (isinstance(path, str) and isinstance(payload, bytes)):
                return None
            if meta is not None and not isinstance(meta, dict):
                return None
    except Exception:
        return None
    return frame


def owner(path: Path) -> str:
    """The worker id a log file belongs to (``<worker id>.<n>.log``)."""
    return _name(path)[0]


def _name(path: Path) -> tuple[str, int]:
    """(worker id, file number) from ``<worker id>.<n>.log``; 0 for a number not one."""
    parts = path.name[: -len(SUFFIX)].rsplit(".", 1)
    return parts[0], int(parts[-1]) if parts[-1].isdigit() else 0


def files(directory: Path) -> list[Path]:
    """The log files in ``directory``, each worker's in the order it wrote them."""
    return sorted(directory.glob(f"*{SUFFIX}"), key=_name)


def by_owner(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """``paths`` grouped by the worker that wrote them, in their order."""
    grouped: dict[str, list[Path]] = {}
    for path in paths:
        grouped.setdefault(owner(path), []).append(path)
    return grouped


class _File:
    """(Under its log's lock.) A log file while frames may still be written to it."""

    __slots__ = ("closed", "end", "fd", "keys", "path", "writing")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.end = 0  # where the next frame goes: each append reserves its place
        self.keys: list[int] = []  # of the calls in the frames written whole
        self.writing = 0  # frames being written
        self.closed = False


class CallLog:
    """One worker process's log: the file appended to now, and the files it started
    before, each with the keys of the calls appended to it.

    Appends from several threads write at once, each at the place it reserved, so a
    disk that stalls one write holds up no other append; the lock orders the
    reservations, the keys, and the switch to a new file (which waits for the writes
    still in the old one before it closes it), and is held for no system call. A
    frame not written whole is cut back if nothing follows it; if something does,
    ``read`` skips it.
    """

    write = staticmethod(os.pwrite)  # (fd, frame, offset) -> bytes written; tests stub it

    def __init__(self, directory: Path, worker: str) -> None:
        self.directory = directory
        self.worker = worker
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._file: _File | None = None  # appended to now; opened at the first append
        self._older: list[tuple[Path, list[int]]] = []  # files started before, oldest first

    def append(self, frame: bytes, keys: Sequence[int]) -> None:
        """Write ``frame`` (the calls ``keys``) in one write; OSError if it is not written
        whole (a full disk): then the next appends go to a new file."""
        size = len(frame)
        lock = self._lock
        lock.acquire()  # not ``with``: its lookups and calls were a fifth of an append
        try:
            file = self._file
            if file is not None:
                file.writing += 1
                offset = file.end
                file.end = offset + size
        finally:
            lock.release()
        if file is None:
            file, offset = self._first(size)
        try:
            written = self.write(file.fd, frame, offset)
            if written != size:
                raise OSError(errno.ENOSPC, f"log write cut short ({written} of {size} bytes)")
        except BaseException:
            self._cut_back(file, offset, size)
            raise
        lock.acquire()
        try:
            file.writing -= 1
            file.keys.extend(keys)
            closing = file is not self._file and self._release(file)
        finally:
            lock.release()
        if closing:
            os.close(file.fd)  # the last write in a file turn() closed meanwhile

    def _first(self, size: int) -> tuple[_File, int]:
        """A new file and the place of the first ``size`` bytes in it (made outside the
        lock: its system calls hold up no other append)."""
        fd, path = self._open()
        with self._lock:
            file = self._file
            if file is None:
                file = self._file = _File(fd, path)
                fd = -1
            file.writing += 1
            offset = file.end
            file.end = offset + size
        if fd >= 0:  # another append made one meanwhile
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
        return file, offset

    def _cut_back(self, file: _File, offset: int, size: int) -> None:
        """The write at ``offset`` failed: the next appends go to a new file; this one is
        cut back to ``offset`` if nothing was placed after it (else ``read`` skips it)."""
        with self._lock:
            last = file.end == offset + size
            if self._file is file:
                self._file = None
        if last:
            with contextlib.suppress(OSError):
                os.ftruncate(file.fd, offset)
        with self._lock:
            file.writing -= 1
            closing = self._release(file)
        if closing:
            os.close(file.fd)

    def _release(self, file: _File) -> bool:
        """(Under ``_lock``.) A file no longer appended to, with no write left in it, joins
        the older ones; True once: then its descriptor is to be closed."""
        if file is self._file or file.writing or file.closed:
            return False
        file.closed = True
        self._older.append((file.path, file.keys))
        return True

    def turn(self, everything: bool = False) -> list[tuple[Path, list[int]]]:
        """Start a new file; return the files whose calls are due to move (those started
        before the previous turn), or with ``everything`` all of them. A file still being
        written to joins them when its last write ends."""
        with self._lock:
            file, self._file = self._file, None
            closed = file is not None and self._release(file)
            if everything or not closed:  # what is older has aged a whole turn at least
                due, self._older = self._older, []
            else:
                due, self._older = self._older[:-1], self._older[-1:]
        if closed:
            assert file is not None
            os.close(file.fd)
        return due

    def keep(self, due: list[tuple[Path, list[int]]]) -> None:
        """Files ``turn`` gave whose calls could not move: due again at the next turn."""
        with self._lock:
            self._older[:0] = due

    def _open(self) -> tuple[int, Path]:
        private_folder(self.directory)
        path = self.directory / f"{self.worker}.{next(_numbers)}{SUFFIX}"
        return private_file(path, os.O_WRONLY), path


def private_folder(path: Path, ours: bool = True) -> None:
    """Make ``path`` (and missing parents) 0700 whatever the umask; an existing one is
    closed to others if it is ``ours`` (the log folder; not the folder a journal file
    was put in, which may hold other things)."""
    if not path.is_dir():
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(FOLDER_MODE, parents=True, exist_ok=True)
        for folder in missing:
            with contextlib.suppress(OSError):  # made by another worker meanwhile
                os.chmod(folder, FOLDER_MODE)
    elif ours:
        make_private(path, FOLDER_MODE)


def private_file(path: Path, flags: int) -> int:
    """Open (creating it 0600 whatever the umask) ``path`` with ``flags``; a descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def make_private(path: Path, mode: int) -> None:
    """``chmod`` a file or folder we own that group or others may read, to ``mode``."""
    with contextlib.suppress(OSError):  # not ours, or gone: the owner's business
        status = path.stat()
        if status.st_uid == os.geteuid() and status.st_mode & 0o077:
            os.chmod(path, mode)
