"""``wsgi.file_wrapper`` (PEP 3333's optional extension): a file sent as the response.

An app returns ``environ["wsgi.file_wrapper"](file, blksize)``; the worker sees
its own ``FileWrapper`` come back and sends the file by blocks it reads straight
into FastCGI records (``Blocks``): one ``preadv`` fills the contents of several
records of a block, and one send takes the block, with no Python work per chunk
beyond that. Any other server, or a middleware that wraps the result, iterates
it instead: ``blksize`` bytes at a time. Either way the file is closed with the
response, and its position ends where the sending did (at its end when it was
sent to the end).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

from ..wire import records

_CONTENT = 65528  # bytes in a record's content: 64 KB less 8, so a record is 8-byte aligned
_RECORDS = 4  # records in a block: 256 KB read and sent at a time
_RECORD = 8 + _CONTENT
_BLOCK = _RECORDS * _RECORD
_RING = 5  # buffers a file's sending may use: the channel holds 4 blocks before it waits
MAX_HEAD = _CONTENT // 2  # a longer response head goes out on its own before the file


class FileWrapper:
    """A file to send as the response body; iterable (``blksize`` bytes at a time),
    and ``close()`` closes the file, as PEP 3333 asks."""

    __slots__ = ("blksize", "filelike")

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        blksize = self.blksize
        while data := read(blksize):
            yield data

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


class Blocks:
    """A file read by blocks straight into STDOUT records of request ``rid``, from its
    current position; ``of()`` gives None when the file has no descriptor to read.

    A block's buffer is sent as it is, and the channel may hold it a while: a ring of
    buffers is reused, each once the channel has sent it (what the channel still holds
    is less than what was pushed after it: its output goes in order)."""

    def __init__(self, filelike: Any, fd: int, offset: int, rid: int) -> None:
        self.filelike = filelike
        self.fd = fd
        self.offset = offset
        self.rid = rid
        self.pushed = 0  # bytes of blocks handed to the channel so far
        # (the buffer as a view, each record's content in it for preadv, ``pushed`` after it)
        self._ring: list[tuple[memoryview, list[memoryview], list[int]]] = []

    @classmethod
    def of(cls, wrapper: FileWrapper, rid: int) -> Blocks | None:
        filelike = wrapper.filelike
        try:
            fd = filelike.fileno()
            offset = filelike.tell()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return None  # BytesIO, a socket's file, something file-like of the app's own
        return cls(filelike, fd, offset, rid)

    def next(self, queued: int, head: bytes = b"") -> memoryview | None:
        """The next block of records, ``head`` (the response's head, at most MAX_HEAD
        bytes) at the front of its first record's content; None at the end of the file.
        ``queued``: bytes the channel holds unsent now."""
        ring = self._ring
        if ring and self.pushed - ring[0][2][0] >= queued:  # the oldest has gone out
            entry = ring.pop(0)
        else:
            if len(ring) >= _RING:
                ring.pop(0)  # still held: the channel keeps it alive, a fresh one follows
            entry = self._buffer()
        ring.append(entry)
        view, iov, mark = entry
        if head:
            view[8 : 8 + len(head)] = head
            iov = [view[8 + len(head) : _RECORD], *iov[1:]]
        got = os.preadv(self.fd, iov, self.offset)
        if not got:
            return None
        self.offset += got
        pack = records.HEADER.pack_into
        left = got + len(head)  # bytes of content, record by record
        at = 0
        while left > 0:
            content = min(left, _CONTENT)
            pack(view, at, records.VERSION_1, records.STDOUT, self.rid, content, 0)
            left -= content
            at += 8 + content
        self.pushed += at
        mark[0] = self.pushed
        return view[:at]

    @staticmethod
    def _buffer() -> tuple[memoryview, list[memoryview], list[int]]:
        view = memoryview(bytearray(_BLOCK))
        iov = [view[i * _RECORD + 8 : (i + 1) * _RECORD] for i in range(_RECORDS)]
        return view, iov, [0]

    def settle(self) -> None:
        """Put the file's own position where the sending ended: its end, once the whole
        file went (a middleware may look, to tell a body sent to the end)."""
        self.filelike.seek(self.offset)
