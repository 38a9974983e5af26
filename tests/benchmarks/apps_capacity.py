"""The capacity scenario's apps: one request in twenty defers work, the rest do not.

Three apps, the same shape: ``/`` answers, ``/defer?S`` answers the same and
defers S seconds of waiting, ``/count`` tells the requests seen, the calls
registered, the deferred counters and the finish-to-start delays.

- ``plain``: the deferred call is a plain ``time.sleep`` (what users write:
  ``send_mail``, ``requests.post``);
- ``coroutine``: ``await asyncio.sleep``;
- ``page``: a Flask view rendering a compiled Jinja template, deferring a plain
  ``time.sleep``: a real page, not hello world;
- ``plain_helper``, ``coroutine_helper``: the first two with ``process=True``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from tests.benchmarks.apps import flask_page
from wsgi_app.deferred import DeferredMiddleware, defer

HELLO = b"Hello world\n"


def blocking_work(seconds: float) -> None:
    time.sleep(seconds)


async def sleeping_work(seconds: float) -> None:
    await asyncio.sleep(seconds)


class _Counted:
    """Counts requests and registered calls; answers ``/count``."""

    def __init__(
        self, work: Callable[[float], Any], inner: Callable[..., Any], **settings: Any
    ) -> None:
        self.work = work
        self.inner = inner
        self.requests = 0
        self.registered = 0
        self.middleware = DeferredMiddleware(self, **settings)

    def __call__(self, environ, start_response):
        self.requests += 1
        path = environ["PATH_INFO"]
        if path == "/defer":
            self.registered += 1
            defer(environ, self.work, float(environ["QUERY_STRING"] or 0.1))
        elif path == "/count":
            return self.count(start_response)
        return self.inner(environ, start_response)

    def count(self, start_response):
        delays = sorted(self.middleware.executor.start_delays())
        p99 = statistics.quantiles(delays, n=100)[98] if len(delays) >= 2 else 0.0
        body = json.dumps(
            {
                "pid": os.getpid(),
                "requests": self.requests,
                "registered": self.registered,
                "deferred": self.middleware.stats(),
                "start_p99_ms": p99 * 1000,
                "start_samples": len(delays),
            }
        ).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [HELLO]


plain = _Counted(blocking_work, _hello).middleware
coroutine = _Counted(sleeping_work, _hello).middleware
page = _Counted(blocking_work, flask_page).middleware
# The same in a helper process (DEFERRED_PROCESS=1): outside the serving GIL.
plain_helper = _Counted(blocking_work, _hello, process=True).middleware
coroutine_helper = _Counted(sleeping_work, _hello, process=True).middleware
