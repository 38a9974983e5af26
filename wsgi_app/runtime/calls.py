"""What deferred work is made of: a ``Call`` (one callable and its arguments) and a
``Batch`` (the calls one request registered, run in that order).

Both are plain data. Each call carries its own state, so every count the worker
shows (status page, access log, exit log) comes from one place: a call is
``queued`` until it starts, ``running`` while it runs, and then ends exactly once
as ``done``, ``failed`` or ``abandoned``.

A call also carries the context it was deferred in (``contextvars.copy_context()``
at ``defer()``): it runs inside it, so what the request bound in context variables
(structlog's fields, Sentry's scope, OpenTelemetry's current span) is there, and
whatever the call sets stays in its own copy.
"""

from __future__ import annotations

import contextvars
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPR_LIMIT = 80  # characters of arguments shown in logs


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({State.DONE, State.FAILED, State.ABANDONED})


@dataclass(eq=False)
class Call:
    """One deferred callable with its arguments, and where it stands."""

    func: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    always: bool = False  # run even when the request failed (``defer_always``)
    state: State = State.QUEUED
    began: float = 0.0  # time.monotonic() when it started running
    thread: int | None = None  # the pool thread running it, for the slow log's stack
    reported: bool = False  # already in the slow log
    # where it runs: the context of its defer(); None (made elsewhere: a journal's
    # takeover) runs it in a fresh, empty one
    context: contextvars.Context | None = None
    span: Any = None  # its OpenTelemetry span while it runs (wsgi_app.runtime.tracing)

    @property
    def name(self) -> str:
        """The callable's qualified name, for logs and spans."""
        try:
            return getattr(self.func, "__qualname__", None) or repr(self.func)
        except Exception:  # a proxy whose attributes raise: the log line must still come
            return f"<{type(self.func).__name__}>"

    def describe(self) -> str:
        """``name(args...)``, the arguments cut to ``REPR_LIMIT`` characters."""
        name = self.name
        shown = [_short_repr(a) for a in self.args]
        shown += [f"{k}={_short_repr(v)}" for k, v in self.kwargs.items()]
        text = ", ".join(shown)
        if len(text) > REPR_LIMIT:
            text = text[: REPR_LIMIT - 3] + "..."
        return f"{name}({text})"


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the call in the log
        text = f"<{type(value).__name__} (repr failed)>"
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


@dataclass(eq=False)
class Batch:
    """The calls one request registered, and where that request came from.

    ``origin`` is ``METHOD /uri``; ``request_id`` the server's ``fcgi.request_id``
    when it offers one. ``next`` is the index of the first call not yet started.
    """

    origin: str
    request_id: str = ""
    calls: list[Call] = field(default_factory=list)
    next: int = 0
    failed: int = 0  # calls that ended failed or abandoned
    accepted: float = 0.0  # time.monotonic() when the executor took it
    began: float = 0.0  # when its first call started
    on_done: Callable[[int, float, int], None] | None = None  # (count, seconds, failures)
    closed: bool = False  # the response ended: calls were handed over, no more are taken

    def travelling(self) -> str:
        """The request as its calls carry it where they travel (a journal row, a Celery
        message): ``METHOD /uri id=REQUEST_ID``."""
        return f"{self.origin} id={self.request_id}" if self.request_id else self.origin

    @classmethod
    def travelled(cls, origin: str, note: str = "") -> Batch:
        """A batch for calls that travelled, from the ``origin`` they carry (see
        ``travelling``), ``note`` (", taken over") after the request."""
        request, found, request_id = origin.rpartition(" id=")
        if not found:
            request, request_id = origin, ""
        return cls(origin=request + note, request_id=request_id)

    def label(self) -> str:
        """How logs name the request: ``(request GET /uri) id=123-4``, the id as in
        the access log."""
        text = f"(request {self.origin})"
        return f"{text} id={self.request_id}" if self.request_id else text

    def report(self) -> None:
        """Every call has ended: tell whoever asked how it went (the access log's line)."""
        if self.on_done is None:
            return
        seconds = time.monotonic() - (self.began or self.accepted)
        self.on_done(len(self.calls), seconds, self.failed)
