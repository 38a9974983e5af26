"""The applications the benchmark serves, the same for every server."""

from __future__ import annotations

import asyncio
import itertools
import json
import os

from wsgi_app.deferred import DeferredMiddleware, defer

HELLO = b"Hello world\n"
MEGABYTE = bytes(range(256)) * 4096
_served = itertools.count(1)
_count = 0
_registered = 0


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [HELLO]


async def sleeping_work(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _bench(environ, start_response):
    """/ hello; /defer?S defers S seconds of sleeping work; /mb 1 MB; /upload echoes
    the size; /count the requests so far and deferred counters."""
    global _count, _registered
    _count = next(_served)
    path = environ["PATH_INFO"]
    if path == "/defer":
        _registered += 1
        defer(environ, sleeping_work, float(environ["QUERY_STRING"] or 1))
    elif path == "/mb":
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(MEGABYTE)))],
        )
        return [MEGABYTE]
    elif path == "/upload":
        size = 0
        stream = environ["wsgi.input"]
        while chunk := stream.read(65536):
            size += len(chunk)
        body = f"{size}\n".encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]
    elif path == "/count":
        body = json.dumps(
            {
                "pid": os.getpid(),
                "requests": _count,
                "registered": _registered,
                "deferred": bench.stats(),
            }
        ).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]
    return hello(environ, start_response)


bench = DeferredMiddleware(_bench)


def _sleepy(environ, start_response):
    """/defer?S defers S seconds of sleeping work; every path answers hello world."""
    if environ["PATH_INFO"] == "/defer":
        defer(environ, sleeping_work, float(environ["QUERY_STRING"] or 1))
    return hello(environ, start_response)


def _kept():
    """Where deferred work is kept, side by side in one worker: /memory/... in memory,
    /journal/... in the journal at $BENCH_JOURNAL, /celery/... handed to Celery at
    $BENCH_CELERY (each when set). One worker for both sides of a comparison: two
    workers differ by a few percent on their own (string hashing is seeded per process)."""
    sides = {"memory": DeferredMiddleware(_sleepy, journal="", celery="")}
    if os.environ.get("BENCH_JOURNAL"):
        sides["journal"] = DeferredMiddleware(_sleepy, journal=os.environ["BENCH_JOURNAL"])
    if os.environ.get("BENCH_CELERY"):
        sides["celery"] = DeferredMiddleware(_sleepy, celery=os.environ["BENCH_CELERY"])

    def app(environ, start_response):
        side, _, rest = environ["PATH_INFO"][1:].partition("/")
        environ["PATH_INFO"] = "/" + rest
        return sides[side](environ, start_response)

    return app


kept = _kept()
