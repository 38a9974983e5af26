"""The worker's own log: the ``fcgi`` logger and its handler on stderr, apart from the app's.

The worker's lines (start, stop, app errors, slow requests) keep their timestamp
with its UTC offset, pid, level and request id whatever the app does to logging:
a Django ``LOGGING`` with a root handler, ``disable_existing_loggers`` or
``logging.basicConfig`` in the app changes the app's loggers, never these. Text
for people, or ``--log-format json``: one JSON object per line, for machines.

A record's own fields (``extra=``, or set by a logging filter) are read by name,
whoever logged it: ``request_id`` and ``trace_id`` (deferred work's lines carry
both) are shown in text lines, and the JSON object has every such field.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

LOGGER = "fcgi"
CHILDREN = ("fcgi.app", "fcgi.slow")  # wsgi.errors, the slow-request log
TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# what every LogRecord has: the rest of a record's attributes are fields given to it
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "request_id",  # found by request_id(), which looks beyond the record's own field
}


_second: list[Any] = [None, "", ""]  # the last whole second, its date-time and offset


def timestamp(created: float) -> str:
    """Local time with milliseconds and the UTC offset, ISO 8601: 2026-11-27T06:50:01.123+00:00.
    The date, time and offset are worked out once a second (access lines call this often)."""
    second = int(created)
    cached = _second
    if cached[0] != second:
        when = datetime.datetime.fromtimestamp(second).astimezone()
        offset = when.strftime("%z")
        cached[:] = [second, when.strftime("%Y-%m-%dT%H:%M:%S"), f"{offset[:3]}:{offset[3:]}"]
    return f"{cached[1]}.{int((created - second) * 1000):03d}{cached[2]}"


def request_id(record: logging.LogRecord) -> str | None:
    """The ``fcgi.request_id`` of the request a worker line is about, if it names one."""
    found = getattr(record, "request_id", None)
    if found:
        return str(found)
    args = record.args if isinstance(record.args, tuple) else ()
    for arg in args:
        environ = getattr(arg, "environ", None)
        if isinstance(environ, dict) and environ.get("fcgi.request_id"):
            return str(environ["fcgi.request_id"])
    return None


class TextFormatter(logging.Formatter):
    """``TIME [PID] LEVEL LOGGER: message id=REQUEST_ID trace=TRACE_ID``, then the
    traceback if any."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        rid = request_id(record)
        if rid and f"id={rid}" not in line:
            line += f" id={rid}"
        trace = getattr(record, "trace_id", None)
        if trace:
            line += f" trace={trace}"
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, logger, message, request_id, the
    record's own fields (``trace_id``, what ``extra=`` or a filter gave it), exception.
    ``json.dumps`` escapes every value, so a line feed in a message never splits a line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id(record)
        if rid:
            data["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in data:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, ensure_ascii=False, default=repr)


class _SteadyLogger(logging.Logger):
    """A logger that ``dictConfig(disable_existing_loggers=True)`` cannot switch off."""

    @property  # type: ignore[override]
    def disabled(self) -> bool:
        return False

    @disabled.setter
    def disabled(self, value: bool) -> None:
        pass


def setup(level: str, fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Give the ``fcgi`` loggers their own handler on ``stream`` (stderr); their lines do
    not reach the root logger, so the app's handlers neither drop nor restyle them. The
    root logger gets the same handler while it has none, so the app's lines (deferred
    work's included) land in the same log until the app sets up logging of its own."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    root = logging.getLogger()
    if not root.handlers:  # the app's own lines (and its middleware's) in the same log,
        root.addHandler(handler)  # until the app configures logging of its own
        root.setLevel(level.upper())
    for name in CHILDREN:  # made now, so an app's later dictConfig cannot switch them off
        logging.getLogger(name)
    for name, child in list(logging.root.manager.loggerDict.items()):
        if (name == LOGGER or name.startswith(LOGGER + ".")) and isinstance(child, logging.Logger):
            child.__class__ = _SteadyLogger
    return handler
