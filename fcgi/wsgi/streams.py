"""The WSGI streams: ``wsgi.input`` (the request body as it arrived) and ``wsgi.errors``."""

from __future__ import annotations

import io
import logging
import tempfile
from typing import Any


class SpooledFile(io.BufferedRandom):
    """A spooled body: a temporary file whose ``read`` takes any negative size as "all
    the rest", as ``io.BytesIO`` (a body kept in memory) does; the C class takes only -1."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(-1 if size is None or size < 0 else size)


def spool_file() -> SpooledFile:
    """An anonymous temporary file for a body past the threshold."""
    return SpooledFile(tempfile.TemporaryFile(buffering=0))


class RequestBody:
    """STDIN as it arrives: in memory, or spooled to a temporary file past a threshold.
    Filled by the I/O loop outside any connection's lock, so a slow disk holds no writer."""

    __slots__ = ("_chunks", "_file", "size", "threshold")
    open_spool = staticmethod(spool_file)  # where a large body goes

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._chunks: list[bytes] = []
        self._file: Any = None
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self.threshold:
            self._file = self.open_spool()
            self._file.writelines(self._chunks)
            self._chunks = []

    def stream(self) -> io.BufferedIOBase:
        """The body to read from the start, for ``wsgi.input``."""
        if self._file is None:
            return io.BytesIO(b"".join(self._chunks))
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class ErrorStream:
    """A text stream that logs each line on the ``fcgi.app`` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("fcgi.app")

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.log.warning("%s", line)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass
