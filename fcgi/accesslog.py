"""The access log: one line per request, written when its response is finished.

PHP-FPM writes its line only after the script ends, post-finish work included
(its bug 68822), so the time it shows is not the visitor's. Here the line goes
out at the finish; when the request's deferred work ends, a second line with
the same request id says how it went, so ``grep id=...`` shows a request end
to end. SIGUSR1 reopens the file, for log rotation; no line is lost: what is
written before the reopen lands in the rotated file.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .request import Request

DEFERRED_FORMAT = "{time} {pid} deferred id={id} count={count} ms={ms} failed={failed}"


class AccessLog:
    """Formats and writes access lines; ``reopen()`` is safe from a signal handler."""

    def __init__(self, path: str, fmt: str, pid: int) -> None:
        self.path = path
        self.format = fmt
        self.pid = pid
        self._lock = threading.Lock()
        self._reopen = False
        self._file: TextIO = self._open()
        self.check_format()

    def _open(self) -> TextIO:
        if self.path == "-":
            return sys.stderr
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def check_format(self) -> None:
        """Fail at start, not at the first request, on a format that cannot be filled.
        Fields the app does not set in ``fcgi.log_fields`` come out as ``-``."""
        sample = dict.fromkeys(
            ("time", "pid", "remote", "method", "uri", "status", "bytes", "ms", "deferred", "id"),
            "",
        )
        try:
            self.format.format_map(_Missing(sample))
        except (IndexError, ValueError) as exc:
            raise ValueError(f"--access-log-format cannot be filled: {exc}") from None

    def reopen(self) -> None:
        self._reopen = True

    def request(self, request: Request, seconds: float, fields: dict[str, Any]) -> None:
        env = request.environ
        values = {
            "time": _now(),
            "pid": self.pid,
            "remote": env.get("REMOTE_ADDR", "-"),
            "method": env.get("REQUEST_METHOD", "-"),
            "uri": env.get("REQUEST_URI") or env.get("PATH_INFO", "-"),
            "status": (request.status or "-")[:3],
            "bytes": request.body_bytes,
            "ms": f"{seconds * 1000:.1f}",
            "deferred": 0,
            "id": env.get("fcgi.request_id", "-"),
            **fields,
        }
        self._write(self.format.format_map(_Missing(values)))

    def deferred(self, request_id: str, count: int, seconds: float, failed: int) -> None:
        self._write(
            DEFERRED_FORMAT.format(
                time=_now(),
                pid=self.pid,
                id=request_id,
                count=count,
                ms=f"{seconds * 1000:.1f}",
                failed=failed,
            )
        )

    def _write(self, line: str) -> None:
        with self._lock:
            if self._reopen:
                self._reopen = False
                if self._file is not sys.stderr:
                    self._file.close()
                    self._file = self._open()
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not sys.stderr:
                self._file.close()


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "-"


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
