"""The applications the benchmark serves, the same for every server."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from wsgi_app.deferred import ENVIRON_KEY, DeferredMiddleware, defer
from wsgi_app.runtime.calls import Call

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


def blocking_work(seconds: float) -> None:
    time.sleep(seconds)


def _blocking(environ, start_response):
    """/defer?S defers S seconds of a plain blocking call; every path answers hello."""
    if environ["PATH_INFO"] == "/defer":
        defer(environ, blocking_work, float(environ["QUERY_STRING"] or 1))
    return hello(environ, start_response)


def _uncaptured(environ, start_response):
    """``_blocking`` with defer() as it was before calls carried a context: the same Call
    appended to the batch, no context captured (the executor gives it an empty one)."""
    if environ["PATH_INFO"] == "/defer":
        environ[ENVIRON_KEY].calls.append(
            Call(blocking_work, (float(environ["QUERY_STRING"] or 1),), {})
        )
    return hello(environ, start_response)


def _traced(app):
    """``app`` under the middleware, each deferred call in a span of an SDK tracer whose
    spans are batched and dropped (no exporter's I/O): what tracing costs the worker."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    # exported every 50 ms, not 5 s: the work stays in the traced side's own rounds
    provider.add_span_processor(BatchSpanProcessor(Dropped(), schedule_delay_millis=50))
    middleware = DeferredMiddleware(app, journal="", celery="")
    middleware.executor.tracer = provider.get_tracer("wsgi_app.deferred")
    return middleware


def _kept():
    """Where deferred work is kept, side by side in one worker: /memory/... in memory,
    /journal/... in the journal at $BENCH_JOURNAL, /celery/... handed to Celery at
    $BENCH_CELERY, /outbox/... to Celery through the journal at $BENCH_OUTBOX (each
    when set). One worker for both sides of a comparison: two workers differ by a few
    percent on their own (string hashing is seeded per process). /plain/...,
    /uncaptured/..., /traced/...: a plain blocking call in memory, deferred as users do,
    without its context, and in an OpenTelemetry span. /SIDE/count: the side's deferred
    counters."""
    sides = {
        "memory": DeferredMiddleware(_sleepy, journal="", celery=""),
        "plain": DeferredMiddleware(_blocking, journal="", celery=""),
        "uncaptured": DeferredMiddleware(_uncaptured, journal="", celery=""),
        "traced": _traced(_blocking),
    }
    if os.environ.get("BENCH_JOURNAL"):
        sides["journal"] = DeferredMiddleware(_sleepy, journal=os.environ["BENCH_JOURNAL"])
    if os.environ.get("BENCH_CELERY"):
        broker = os.environ["BENCH_CELERY"]
        sides["celery"] = DeferredMiddleware(_sleepy, journal="", celery=broker)
        if os.environ.get("BENCH_OUTBOX"):
            outbox = os.environ["BENCH_OUTBOX"]
            sides["outbox"] = DeferredMiddleware(_sleepy, journal=outbox, celery=broker)

    def app(environ, start_response):
        side, _, rest = environ["PATH_INFO"][1:].partition("/")
        if rest == "count":  # /SIDE/count: that side's deferred counters
            body = json.dumps(sides[side].stats()).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        environ["PATH_INFO"] = "/" + rest
        return sides[side](environ, start_response)

    return app


kept = _kept()


def _flask_page() -> Callable[..., Any]:
    from flask import Flask, render_template
    from jinja2 import DictLoader

    app = Flask(__name__)
    template = """<!doctype html>
<title>{{ title }}</title>
<h1>{{ title }}</h1>
<ul>{% for item in items %}<li class="{{ loop.cycle('odd', 'even') }}">{{ item.name }}:
{{ "%.2f"|format(item.price) }}</li>{% endfor %}</ul>
<p>{{ items|length }} items, {{ items|sum(attribute='price')|round(2) }} in all.</p>"""
    items = [{"name": f"item {i}", "price": i * 1.25} for i in range(20)]
    app.jinja_loader = DictLoader({"page.html": template})  # compiled once, then cached

    @app.route("/")
    @app.route("/defer")
    def page():
        return render_template("page.html", title="A real page", items=items)

    return app.wsgi_app


flask_page = _flask_page()  # a real page: a Flask view rendering a 20-row Jinja template


def files(environ, start_response):
    """``/wrapper``: the file at $BENCH_FILE through ``wsgi.file_wrapper``; ``/iterable``:
    the same file as a generator of 64 KB reads, what an app without it returns."""
    path = os.environ["BENCH_FILE"]
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(os.path.getsize(path))),
        ],
    )
    f = open(path, "rb")  # noqa: SIM115 - closed with the response
    if environ["PATH_INFO"] == "/wrapper":
        return environ["wsgi.file_wrapper"](f, 65536)
    return _pieces(f)


def _pieces(f):
    with f:
        while data := f.read(65536):
            yield data
