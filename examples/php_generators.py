"""PHP's generator coroutines (``yield`` under ReactPHP/Amp): many waits, one process.

PHP::

    function job() { $data = yield $http->get($url); yield $db->save($data); }
    // needs an event loop library, and everything it calls must be non-blocking

Here a deferred ``async def`` is the coroutine: every request's coroutines
interleave on the worker's one deferred loop (100 calls waiting 0.3 s end in about
0.3 s, not 30 s), after the response, and an exception is logged with its request.

    python -m fcgi --bind 127.0.0.1:9000 examples.php_generators:application
"""

from __future__ import annotations

import asyncio
import os
import threading

from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


async def job(tag: str) -> None:
    """Three steps, each waiting; other jobs run while this one waits."""
    for _step in range(3):
        await asyncio.sleep(0.1)
    note(f"job {tag} done on thread {threading.current_thread().name}")


def app(environ, start_response):
    defer(environ, job, environ.get("QUERY_STRING") or "-")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"started\n"]


application = DeferredMiddleware(app)
