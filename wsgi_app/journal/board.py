"""Which calls a worker is running right now, in a file it maps into memory.

A call that was running when its worker died counts as a failed attempt (it may be
what killed the worker: a segfault, the OOM killer), one that had not started does
not. Knowing which is which must cost the call nothing measurable: no system call
per start. Each running call's key sits in a slot of ``<worker id>.running`` beside
the worker's log files, a file mapped shared, so what was stored before the process
died is in the page cache for the worker that takes over: it reads the file, then
removes it. A clean stop (a reload, a graceful stop) removes it first: the calls it
cut were not at fault.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import struct
from pathlib import Path

from .log import private_file

SUFFIX = ".running"
SLOT = struct.Struct("<q")  # a call's key in its worker's log (below 0), or its row id
_pack = SLOT.pack_into


class Board:
    """One worker's slots: ``mark`` a call as it starts, ``clear`` it as it ends."""

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        fd = private_file(path, os.O_RDWR | os.O_TRUNC)
        try:
            os.ftruncate(fd, slots * SLOT.size)
            self._map: mmap.mmap | None = mmap.mmap(fd, slots * SLOT.size)
        finally:
            os.close(fd)
        self._free = collections.deque(range(slots))  # append and popleft are atomic

    def mark(self, value: int) -> int:
        """Store ``value`` in a free slot; the slot, or -1 when none is free (then a
        death while the call runs counts no attempt for it)."""
        try:
            slot = self._free.popleft()
        except IndexError:
            return -1
        self._store(slot, value)
        return slot

    def clear(self, slot: int) -> None:
        if slot < 0:
            return
        self._store(slot, 0)
        self._free.append(slot)

    def _store(self, slot: int, value: int) -> None:
        board = self._map
        if board is not None:
            try:
                _pack(board, slot * 8, value)
            except ValueError:  # closed meanwhile (a stop); suppress() would cost 0.5 µs
                return

    def close(self) -> None:
        """Remove the file: nothing running now counts as having died with the worker."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        board, self._map = self._map, None
        if board is not None:
            with contextlib.suppress(BufferError):  # a mark under way: dropped with the process
                board.close()


def path_for(directory: Path, worker: str) -> Path:
    return directory / f"{worker}{SUFFIX}"


def files(directory: Path) -> list[Path]:
    return list(directory.glob(f"*{SUFFIX}"))


def owner(path: Path) -> str:
    """The worker id a board belongs to."""
    return path.name[: -len(SUFFIX)]


def running(path: Path) -> set[int]:
    """The keys and row ids a gone worker was running when it died (none if it left no
    board: a clean stop, or a worker from before boards)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    count = len(data) // SLOT.size
    return {value for (value,) in SLOT.iter_unpack(data[: count * SLOT.size]) if value}
