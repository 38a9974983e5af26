"""Tiny WSGI applications the tests serve (the way waitress keeps fixture apps)."""

from __future__ import annotations

import os
import time
from wsgiref.validate import validator

from tests.gate import wait_at
from wsgi_app.deferred import DeferredMiddleware, defer, defer_always, finish_request

LOG = os.environ.get("TEST_APP_LOG", "/dev/null")


def note(event: str) -> None:
    """Append ``event <time>`` to the file the test reads."""
    with open(LOG, "a") as f:
        f.write(f"{event} {time.time():.6f}\n")


def query_args(environ) -> dict[str, str]:
    """``a=1&b=2`` as ``{"a": "1", "b": "2"}`` (no unquoting: the tests send plain words)."""
    return dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"Hello world\n"]


def echo(environ, start_response):
    """Echo the body back; report the path as the app saw it in headers."""
    body = environ["wsgi.input"].read()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(body))),
            (
                "X-Script-Name",
                f"[{environ['SCRIPT_NAME']}]",
            ),  # bracketed: some servers drop empty headers
            ("X-Path-Info", f"[{environ['PATH_INFO']}]"),
            ("X-Scheme", environ["wsgi.url_scheme"]),
            ("X-Remote-Addr", environ.get("REMOTE_ADDR", "")),
        ],
    )
    return [body]


def echo_read(environ, start_response):
    """Echo the body as ``wsgi.input.read(N)`` returns it, N from the query (``?-5``)."""
    body = environ["wsgi.input"].read(int(environ["QUERY_STRING"]))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


def download(environ, start_response):
    size = int(environ.get("QUERY_STRING") or 3_000_000)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    start_response(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data)))]
    )
    # in pieces, through a generator: the streaming path
    return (data[i : i + 100_000] for i in range(0, len(data), 100_000))


def slow_sleep(seconds: float, tag: str) -> None:
    time.sleep(seconds)
    note(f"done {tag}")


def held(gate: str, tag: str) -> None:
    """Deferred work held at the test's gate (tests/gate.py) until the test opens it."""
    note(f"waiting {tag}")
    wait_at(gate)
    note(f"done {tag}")


def _deferring(environ, start_response):
    """Defers one call: held at ``gate=PATH`` if given, else sleeping ``seconds``."""
    query = query_args(environ)
    tag = query.get("tag", "x")
    if "gate" in query:
        defer(environ, held, query["gate"], tag)
    else:
        defer(environ, slow_sleep, float(query.get("seconds", "2")), tag)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"deferred " + tag.encode() + b"\n"]


deferring = DeferredMiddleware(_deferring)


def _php_style(environ, start_response):
    """PHP's way: write, finish the request, go on working in the same call."""
    query = query_args(environ)
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"program start...\n")
    finish_request(environ)
    if "gate" in query:
        note(f"waiting {query.get('tag', 'x')}")
        wait_at(query["gate"])
    else:
        time.sleep(float(query.get("seconds", "2")))
    write(b"debug...\n")
    note(f"done {query.get('tag', 'x')}")
    return []


php_style = DeferredMiddleware(_php_style)


def _environ_check(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    environ["wsgi.errors"].write("checked\n")
    return [b"ok " + str(len(body)).encode()]


validated = validator(_environ_check)


def boom(environ, start_response):
    raise RuntimeError("boom")


def fail_after(environ, start_response):
    def body():
        yield b"partial"
        raise RuntimeError("mid-body")

    start_response("200 OK", [("Content-Type", "text/plain")])
    return body()


def _many_deferred(environ, start_response):
    """Defers ``n`` calls of ``seconds`` each (query n=..&seconds=..)."""
    query = query_args(environ)
    for i in range(int(query.get("n", "12"))):
        defer(environ, slow_sleep, float(query.get("seconds", "1.5")), f"job{i}")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"queued\n"]


many_deferred = DeferredMiddleware(_many_deferred)


def stuck_in_the_app(environ, start_response):
    time.sleep(float(environ.get("QUERY_STRING") or 1.5))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"late\n"]


def _streamer(environ, start_response):
    """Defers a note (and another with defer_always), then streams a long body slowly:
    for visitors who leave."""
    defer(environ, note, "done streamer")
    defer_always(environ, note, "always streamer")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def body():
        for _ in range(200):
            yield b"x" * 65536
            time.sleep(0.005)

    return body()


streamer = DeferredMiddleware(_streamer)


def never_called(environ, start_response):
    raise AssertionError("the worker should have answered this path itself")


def _one_deferred(environ, start_response):
    defer(environ, time.sleep, float(environ.get("QUERY_STRING") or 0.3))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


one_deferred = DeferredMiddleware(_one_deferred)


def _router(environ, start_response):
    """/defer and /php as above; any other path echoes (and reports the path split)."""
    path = environ["PATH_INFO"]
    if path == "/defer":
        return _deferring(environ, start_response)
    if path == "/php":
        return _php_style(environ, start_response)
    return echo(environ, start_response)


router = DeferredMiddleware(_router)


def _affinity_probe(environ, start_response):
    """/command writes the CPUs a command started after the response may use to the file
    in the query; every other path answers the worker's own."""
    from wsgi_app.background import run_after

    if environ["PATH_INFO"] == "/command":
        out = query_args(environ)["out"]
        run_after(environ, ["sh", "-c", f"grep Cpus_allowed_list /proc/self/status > {out}"])
    body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [body]


affinity_probe = DeferredMiddleware(_affinity_probe)


def _note_policy(out: str, where: str) -> None:
    with open(out, "a") as f:
        f.write(f"{where} {os.sched_getscheduler(0)}\n")


async def _note_policy_async(out: str, where: str) -> None:
    _note_policy(out, where)


def _policy_probe(environ, start_response):
    """Writes the scheduling policy of the thread serving the request, of a plain deferred
    call and of a coroutine's, one line each, to the file in the query."""
    out = query_args(environ)["out"]
    _note_policy(out, "serving")
    defer(environ, _note_policy, out, "plain")
    defer(environ, _note_policy_async, out, "coroutine")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


policy_probe = DeferredMiddleware(_policy_probe)
