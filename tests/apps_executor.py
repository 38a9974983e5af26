"""Apps for the deferred executor's tests (tests/test_executor*.py), served by a real worker."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs

from tests.gate import wait_at
from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("TEST_APP_LOG", "/dev/null")
_lock = threading.Lock()


def note(event: str) -> None:
    """Append ``event`` to the file the test reads, one line each."""
    with _lock, open(LOG, "a") as f:
        f.write(f"{event}\n")


def hang_forever(tag: str) -> None:
    threading.Event().wait()


def work(seconds: float | str, tag: str, fail: bool) -> None:
    """Sleep ``seconds``, or wait at the test's gate when it is a path (tests/gate.py)."""
    if isinstance(seconds, str):
        wait_at(seconds)
    else:
        time.sleep(seconds)
    if fail:
        raise RuntimeError(f"failing on purpose: {tag}")
    note(f"done {tag}")


def _json(start_response, data: object):
    body = json.dumps(data).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _app(environ, start_response):
    """/exit: sys.exit() then ten notes; /hang: a call that never returns;
    /work?n=N&s=S&fail=K: N calls of S seconds (or held at gate=PATH), every K-th
    failing; /count: counters."""
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    if path == "/exit":
        defer(environ, sys.exit, 3)
        for i in range(10):
            defer(environ, note, f"after {i}")
    elif path == "/hang":
        defer(environ, hang_forever, "x" * 200)
    elif path == "/work":
        fail_every = int(query.get("fail", 0))
        for i in range(int(query.get("n", 1))):
            failing = bool(fail_every) and i % fail_every == fail_every - 1
            hold = query["gate"] if "gate" in query else float(query.get("s", 0.1))
            defer(environ, work, hold, f"{query.get('tag', '')}-{i}", failing)
    elif path == "/count":
        return _json(start_response, environ["tests.stats"]())
    elif path == "/pid":
        defer(environ, note_pid)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


def _make(**settings) -> DeferredMiddleware:
    def app(environ, start_response):
        environ["tests.stats"] = middleware.stats
        return _app(environ, start_response)

    middleware = DeferredMiddleware(app, **settings)
    return middleware


def note_pid() -> None:
    note(f"pid {os.getpid()}")


executor = _make()
helper = _make(process=True)  # the same in a helper process


def _failing(environ, start_response):
    """/ registers a call and one that runs anyway, then raises; /?ok the same, and answers."""
    from wsgi_app.deferred import defer_always

    ok = environ["QUERY_STRING"] == "ok"
    defer(environ, note, "ok-call" if ok else "failed-call")
    defer_always(environ, note, "always-call")
    if not ok:
        raise RuntimeError("the app failed")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


failing = DeferredMiddleware(_failing)
