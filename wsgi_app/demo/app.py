"""The demo application: PHP's finish-request experiment, ping and a status page.

``/demo`` is the seed experiment ported from PHP: the visitor gets
``program start...`` at once; the worker goes on for about 11 s and logs
``start-time``, ``start-proceed`` and ``end-time`` to the demo log.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from ..deferred import DeferredMiddleware, finish_request

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

DEMO_LOG = os.environ.get("DEMO_LOG", os.path.join("var", "log", "demo.log"))
# Query parameters of /demo that shorten its sleeps: name -> (default, largest allowed).
DEMO_SLEEPS = {"pause": (1.0, 1.0), "work": (10.0, 10.0)}

_served = itertools.count(1)
_requests = 0
_log_lock = threading.Lock()

INDEX = """<!doctype html>
<title>fcgi-finish demo</title>
<h1>fcgi-finish</h1>
<p>PHP's <code>fastcgi_finish_request()</code> for Python: the visitor gets the page
at once, and the same worker goes on with the slow part.</p>
<ul>
<li><a href="demo">/demo</a>: prints <code>program start...</code>, logs
<code>start-time</code>, finishes the request, sleeps 1 s, writes <code>debug...</code>
(never sent), logs <code>start-proceed</code>, sleeps 10 s, logs <code>end-time</code>
to <code>{log}</code>. <code>?pause=S&amp;work=S</code> shorten the sleeps
(at most 1 and 10).</li>
<li><a href="ping">/ping</a>: <code>pong</code>.</li>
<li><a href="status">/status</a>: this worker's counters, as JSON.</li>
</ul>
"""


def log_line(event: str, demo_id: str) -> None:
    """Append ``event:<unix time>`` for one demo run to the demo log."""
    line = f"{event}:{time.time():.6f} id={demo_id} pid={os.getpid()}\n"
    os.makedirs(os.path.dirname(DEMO_LOG) or ".", exist_ok=True)
    with _log_lock, open(DEMO_LOG, "a", encoding="utf-8") as f:
        f.write(line)


def _text(start_response: StartResponse, status: str, body: str, ctype: str = "text/plain"):
    data = body.encode("utf-8")
    start_response(
        status, [("Content-Type", f"{ctype}; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _sleeps(query: str) -> dict[str, float]:
    """The sleeps of /demo from its query string; ValueError names a bad parameter."""
    values = parse_qs(query, keep_blank_values=True)
    unknown = set(values) - set(DEMO_SLEEPS)
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}; use pause and work")
    sleeps = {}
    for name, (default, most) in DEMO_SLEEPS.items():
        raw = values.get(name, [str(default)])[-1]
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
        if not 0 <= seconds <= most:
            raise ValueError(f"{name}={raw} must be between 0 and {most:g} seconds")
        sleeps[name] = seconds
    return sleeps


def demo(environ: WSGIEnvironment, start_response: StartResponse):
    try:
        sleeps = _sleeps(environ.get("QUERY_STRING", ""))
    except ValueError as exc:
        return _text(start_response, "400 Bad Request", f"{exc}\n")
    demo_id = uuid.uuid4().hex[:12]
    write = start_response(
        "200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("X-Demo-Id", demo_id)]
    )
    write(b"program start...\n")
    log_line("start-time", demo_id)
    finish_request(environ)
    time.sleep(sleeps["pause"])
    write(b"debug...\n")  # after the finish: dropped by the server, never seen by the visitor
    log_line("start-proceed", demo_id)
    time.sleep(sleeps["work"])
    log_line("end-time", demo_id)
    return []


def app(environ: WSGIEnvironment, start_response: StartResponse):
    global _requests
    _requests = next(_served)
    path = environ.get("PATH_INFO", "/")
    if path == "/demo":
        return demo(environ, start_response)
    if path == "/ping":
        return _text(start_response, "200 OK", "pong\n")
    if path == "/status":
        status = {"pid": os.getpid(), "requests": _requests, "deferred": application.stats()}
        return _text(start_response, "200 OK", json.dumps(status) + "\n", "application/json")
    if path in ("/", ""):
        return _text(start_response, "200 OK", INDEX.format(log=html.escape(DEMO_LOG)), "text/html")
    return _text(start_response, "404 Not Found", f"no page at {path}\n")


application = DeferredMiddleware(app)
