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

A frame is a header (length, CRC-32) and a pickle: ``("calls", request, origin,
created, [(path, payload), ...], keys)`` for a request's calls, ``("ended", keys)``
for calls that ended since (written every ``DONE_DELAY`` by the journal's flusher,
so a taken-over log runs again only what ended in the last moments). Reading stops
at a frame cut short or damaged.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import pickle
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger("wsgi_app.deferred")

MOVE_EVERY = 0.25  # seconds between new files; a call still running past one is moved
HEADER = struct.Struct("<II")  # length of the pickle, its CRC-32
SUFFIX = ".log"

Pending = tuple[str, str, float, str, bytes]  # request, origin, created, path, payload

# the files' numbers, one sequence per process: two journals' logs (two middlewares on
# one file) share the worker id, never a file
_numbers = itertools.count(1)


def encode(
    request: str,
    origin: str,
    created: float,
    calls: Sequence[tuple[str, bytes]],
    keys: Sequence[int],
) -> bytes:
    return _frame(("calls", request, origin, created, list(calls), list(keys)))


def encode_ended(keys: Sequence[int]) -> bytes:
    return _frame(("ended", list(keys)))


def _frame(value: tuple) -> bytes:
    body = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def pending(paths: Sequence[Path], warn: bool = True) -> Iterator[Pending]:
    """The calls in one worker's log files (in the order written) not said to have ended."""
    frames = [frame for path in paths for frame in read(path, warn)]
    ended = {key for frame in frames if frame[0] == "ended" for key in frame[1]}
    for frame in frames:
        if frame[0] == "calls":
            _, request, origin, created, calls, keys = frame
            for key, (path, payload) in zip(keys, calls, strict=True):
                if key not in ended:
                    yield request, origin, created, path, payload


def read(path: Path, warn: bool = True) -> Iterator[tuple]:
    """The frames of a log file, up to the first one cut short or damaged (``warn``:
    say so; a file still written to may end in a frame half written)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    pos = 0
    while pos < len(data):
        if pos + HEADER.size > len(data):
            break
        length, crc = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size : pos + HEADER.size + length]
        if not length or len(body) < length or zlib.crc32(body) != crc:
            break  # zeros (an empty body's CRC is 0) are a tail never written too
        frame = _decoded(body)
        if frame is None:
            break
        yield frame
        pos += HEADER.size + length
    if pos < len(data) and warn:
        log.warning(
            "deferred journal log %s: %d byte(s) at its end cut short or damaged, ignored",
            path,
            len(data) - pos,
        )


def _decoded(body: bytes) -> tuple | None:
    """The frame in ``body``, or None if it is not one (whatever its CRC says)."""
    try:
        frame = pickle.loads(body)
        if frame[0] == "ended" and len(frame) == 2:
            return frame if all(isinstance(key, int) for key in frame[1]) else None
        kind, request, origin, created, calls, keys = frame
        if kind != "calls" or not (isinstance(request, str) and isinstance(origin, str)):
            return None
        if not isinstance(created, float) or len(calls) != len(keys):
            return None
        for path, payload in calls:
            if not (isinstance(path, str) and isinstance(payload, bytes)):
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


class CallLog:
    """One worker process's log: the file appended to now, and the files it started
    before, each with the keys of the calls appended to it."""

    def __init__(self, directory: Path, worker: str) -> None:
        self.directory = directory
        self.worker = worker
        self.pid = os.getpid()
        self._lock = threading.Lock()  # orders appends and the switch to a new file
        self._fd = -1  # opened at the first append
        self._path: Path | None = None
        self._size = 0  # of the current file: what a write cut short is cut back to
        self._keys: list[int] = []  # of the calls in the current file
        self._older: list[tuple[Path, list[int]]] = []  # files started before, oldest first

    def append(self, frame: bytes, keys: Sequence[int]) -> None:
        """Write ``frame`` (the calls ``keys``) in one ``write``; OSError if it is not
        written whole (a full disk): then nothing of it is left to hide later frames."""
        with self._lock:
            if self._fd < 0:
                self._fd, self._path = self._open()
                self._size = 0
            try:
                written = os.write(self._fd, frame)
                if written != len(frame):
                    raise OSError(
                        errno.ENOSPC, f"log write cut short ({written} of {len(frame)} bytes)"
                    )
            except OSError:
                # cut it back, and start a new file: a torn frame would end the reading
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                self._close()
                raise
            self._size += written
            self._keys.extend(keys)

    def _close(self) -> None:
        """(Under ``_lock``.) Close the current file: the next append opens another."""
        if self._fd >= 0 and self._path is not None:
            os.close(self._fd)
            self._older.append((self._path, self._keys))
        self._fd, self._path, self._keys = -1, None, []

    def turn(self, everything: bool = False) -> list[tuple[Path, list[int]]]:
        """Start a new file; return the files whose calls are due to move (those started
        before the previous turn), or with ``everything`` all of them."""
        with self._lock:
            closed = self._fd >= 0
            self._close()
            if everything or not closed:  # what is older has aged a whole turn at least
                due, self._older = self._older, []
            else:
                due, self._older = self._older[:-1], self._older[-1:]
        return due

    def keep(self, due: list[tuple[Path, list[int]]]) -> None:
        """Files ``turn`` gave whose calls could not move: due again at the next turn."""
        with self._lock:
            self._older[:0] = due

    def _open(self) -> tuple[int, Path]:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.worker}.{next(_numbers)}{SUFFIX}"
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), path
