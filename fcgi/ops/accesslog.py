"""The access log: one line per request, written when its response is finished.

PHP-FPM writes its line only after the script ends, post-finish work included
(its bug 68822), so the time it shows is not the visitor's. Here the line goes
out at the finish; when the request's deferred work ends, a second line with
the same request id says how it went, so ``grep id=...`` shows a request end
to end. SIGUSR1 reopens the file, for log rotation; no line is lost: what is
written before the reopen lands in the rotated file.

``--access-log-format`` is ``combined`` (nginx's and Apache's, then the response
time and request id: log analysers read it), ``json`` (one JSON object per line)
or a template. Every value is escaped before it goes in, as nginx does: a
REQUEST_URI or User-Agent with a line feed or a quote cannot forge a line or a
field; in a JSON-shaped template (one that starts with a literal brace, ``{{``)
values are escaped as JSON strings.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import string
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from .logs import timestamp

if TYPE_CHECKING:
    from ..wsgi.request import Request

COMBINED = (
    '{remote} - - [{time_local}] "{method} {uri} {protocol}" {status} {bytes} "{referer}" '
    '"{agent}" rt={seconds} id={id}'
)
FIELDS = (
    "time",
    "time_local",
    "pid",
    "remote",
    "method",
    "uri",
    "protocol",
    "status",
    "bytes",
    "ms",
    "seconds",
    "referer",
    "agent",
    "deferred",
    "id",
)
DEFERRED_FORMAT = "{time} {pid} deferred id={id} count={count} ms={ms} failed={failed}"
log = logging.getLogger("fcgi")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\]')


def escape(value: object) -> str:
    """nginx's escaping: quote, backslash and control characters as \\xHH."""
    text = str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the usual case, without the regular expression
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02X}", text)


def escape_json(value: object) -> str:
    """The inside of a JSON string: safe between the quotes of a JSON-shaped template."""
    return json.dumps(str(value), ensure_ascii=False)[1:-1]


class AccessLog:
    """Formats and writes access lines; ``reopen()`` is safe from a signal handler."""

    def __init__(self, path: str, fmt: str, pid: int) -> None:
        # absolute: a reopen must find the same file after the app changed folder
        self.path = path if path == "-" else os.path.abspath(path)
        self.json = fmt == "json"
        self.format = COMBINED if fmt == "combined" else fmt
        # JSON-shaped: starts with a literal brace, written {{ in a format string
        self.escape = escape_json if fmt.lstrip().startswith("{{") else escape
        # the fields the format names: only those are worked out and escaped
        self.used = {
            name.split(".")[0].split("[")[0] for _, name, _, _ in _parse(self.format) if name
        }
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
        if self.json:
            return
        try:
            self.format.format_map(_Missing(dict.fromkeys(FIELDS, "")))
        except (IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"--access-log-format cannot be filled: {exc}") from None

    def reopen(self) -> None:
        self._reopen = True

    def request(self, request: Request, seconds: float, fields: dict[str, Any]) -> None:
        env = request.environ
        now = time.time()
        values: dict[str, Any] = {
            "pid": self.pid,
            "remote": env.get("REMOTE_ADDR") or "-",
            "method": env.get("REQUEST_METHOD") or "-",
            "uri": env.get("REQUEST_URI") or env.get("PATH_INFO") or "-",
            "protocol": env.get("SERVER_PROTOCOL") or "-",
            "status": (request.status or "-")[:3],
            "bytes": request.body_bytes,
            "referer": env.get("HTTP_REFERER") or "-",
            "agent": env.get("HTTP_USER_AGENT") or "-",
            "deferred": 0,
            "id": env.get("fcgi.request_id", "-"),
            **fields,
        }
        if self.json:
            values["time"] = timestamp(now)
            values["status"] = int(values["status"]) if values["status"].isdigit() else None
            values["ms"] = round(seconds * 1000, 1)
            self._write(json.dumps(values, ensure_ascii=False, default=str))
            return
        used = self.used
        if "time" in used:
            values["time"] = timestamp(now)
        if "time_local" in used:
            values["time_local"] = _time_local(now)
        if "ms" in used:
            values["ms"] = f"{seconds * 1000:.1f}"
        if "seconds" in used:
            values["seconds"] = f"{seconds:.3f}"
        escape = self.escape
        safe = {key: escape(values[key]) for key in used if key in values}
        self._write(self.format.format_map(_Missing(safe)))

    def deferred(self, request_id: str, count: int, seconds: float, failed: int) -> None:
        values = {
            "time": timestamp(time.time()),
            "pid": self.pid,
            "event": "deferred",
            "id": request_id,
            "count": count,
            "ms": round(seconds * 1000, 1),
            "failed": failed,
        }
        if self.json:
            self._write(json.dumps(values, ensure_ascii=False))
        else:
            values["ms"] = f"{seconds * 1000:.1f}"
            self._write(DEFERRED_FORMAT.format_map({k: escape(v) for k, v in values.items()}))

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


def _parse(fmt: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(fmt))
    except ValueError:
        return []  # check_format says what is wrong


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "-"


_local: list[Any] = [None, ""]  # the last whole second and its $time_local


def _time_local(now: float) -> str:
    """nginx's $time_local: 27/Nov/2026:06:50:01 +0000, English month whatever the locale;
    worked out once a second."""
    second = int(now)
    if _local[0] != second:
        when = datetime.datetime.fromtimestamp(second).astimezone()
        month = _MONTHS[when.month - 1]
        _local[:] = [second, f"{when.day:02d}/{month}/{when:%Y:%H:%M:%S %z}"]
    return _local[1]


def log_access(access_log: AccessLog) -> Callable[[Request], None]:
    """The ``on_finish`` hook that writes the request's access-log line."""

    def on_finish(request: Request) -> None:
        # the environ is the app's: a line it spoiled is logged, never raised into the loop
        try:
            fields = request.environ.get("fcgi.log_fields") or {}
            access_log.request(request, time.monotonic() - request.started, fields)
        except Exception:
            log.exception("%s: its access-log line could not be written", request)

    return on_finish
