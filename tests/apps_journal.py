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
from wsgi_app.deferred import DeferredMiddleware, defer, volatile


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


def app(environ, start_response):
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    out, what = query.get("out", "/dev/null"), environ["PATH_INFO"]
    if what == "/defer":
        for i in range(int(query.get("n", 1))):
            text = f"{query.get('tag', 'call')}-{i}"
            if "gate" in query:
                defer(environ, append_after, out, text, query["gate"])
            else:
                defer(environ, append, out, text, float(query.get("s", 0)))
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
