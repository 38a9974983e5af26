"""Apps and deferred functions for the journal and Celery tests.

Each deferred function appends a line to a file named in its arguments, with the
pid of the process that ran it, so a test sees every run (and every second run).
"""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import parse_qs

from tests.gate import wait_at
from wsgi_app.deferred import DeferredMiddleware, defer, finish_request, volatile


def append(path: str, text: str, seconds: float = 0.0) -> None:
    """Sleep ``seconds``, then append ``text pid``."""
    if seconds:
        time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def append_after(path: str, text: str, gate: str) -> None:
    """Wait at the test's gate (tests/gate.py), then append ``text pid``."""
    wait_at(gate)
    append(path, text)


async def append_async(path: str, text: str) -> None:
    append(path, text)


def poisoned(path: str) -> None:
    """Always fails, after leaving a trace of the attempt."""
    append(path, "attempt")
    raise RuntimeError("poisoned call")


class Page:
    """A live object: its bound methods cannot be recorded."""

    def save(self, path: str) -> None:
        append(path, "saved")


def defer_n(environ, query: dict[str, str]) -> None:
    """Defer ``n`` appends tagged ``tag-0``... to ``out``, each sleeping ``s`` first (or
    waiting for the test to open ``gate``)."""
    out, tag = query.get("out", "/dev/null"), query.get("tag", "call")
    for i in range(int(query.get("n", 1))):
        if "gate" in query:
            defer(environ, append_after, out, f"{tag}-{i}", query["gate"])
        else:
            defer(environ, append, out, f"{tag}-{i}", float(query.get("s", 0)))


def ending(environ, start_response):
    """Each way a response ends, calls deferred before (or after) it: ``/finish`` (PHP
    style: defer, finish_request(), then ``work`` seconds more), ``/after-finish``
    (finish, then defer and say so in ``out``.deferred, then ``work``), ``/stream``
    (defer while the body streams), ``/write`` (write() a page, then defer), anything
    else a list body; ``/pid``: the worker's pid."""
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    what, work = environ["PATH_INFO"], float(query.get("work", 0))
    if what == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if what == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _streamed(environ, query)
    if what == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        write(b"ok\n")
        defer_n(environ, query)
        time.sleep(work)
        return []
    if what in ("/finish", "/after-finish"):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        if what == "/finish":
            defer_n(environ, query)
        finish_request(environ)  # the visitor has the page: then the slow part
        if what == "/after-finish":
            defer_n(environ, query)
            with open(query["out"] + ".deferred", "a") as f:
                f.write(f"{query.get('tag', 'call')}\n")
        time.sleep(work)
        return []
    defer_n(environ, query)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


def _streamed(environ, query):
    yield b"first\n"
    defer_n(environ, query)
    yield b"second\n"


def app(environ, start_response):
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    out, what = query.get("out", "/dev/null"), environ["PATH_INFO"]
    if what == "/defer":
        defer_n(environ, query)
    elif what == "/async":
        defer(environ, append_async, out, query.get("tag", "async"))
    elif what == "/poison":
        defer(environ, poisoned, out)
    elif what == "/lambda":
        defer(environ, lambda: append(out, "lambda"))
    elif what == "/method":
        defer(environ, Page().save, out)
    elif what == "/socket":
        defer(environ, append, out, threading.Lock())
    elif what == "/volatile":
        defer(environ, volatile(lambda: append(out, "volatile")))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


application = DeferredMiddleware(app)
endings = DeferredMiddleware(ending)
