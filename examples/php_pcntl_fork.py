"""PHP's ``pcntl_fork()``: a child process per job, so the page need not wait.

PHP::

    $pid = pcntl_fork();
    if ($pid == 0) { crunch(); exit(0); }   // the child; the parent must pcntl_wait()
                                            // or it leaves a zombie; the child shares
                                            // the parent's sockets and DB connections

Not needed here: the response is already sent before deferred work starts, and a
deferred call runs on the worker's own threads. Forking a threaded worker is unsafe
(locks held by other threads stay locked in the child), so CPU-heavy work goes to a
process pool started with "spawn" (fresh interpreters, reaped by the pool), awaited
from a deferred coroutine: the GIL of the serving threads stays free.

    python -m fcgi --bind 127.0.0.1:9000 examples.php_pcntl_fork:application
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import threading
from urllib.parse import parse_qs

from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def crunch(n: int) -> tuple[int, int]:
    """CPU-bound work, in a pool process: (result, that process's pid)."""
    return sum(i * i for i in range(n)), os.getpid()


def pool() -> concurrent.futures.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            spawn = multiprocessing.get_context("spawn")
            _pool = concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=spawn)
        return _pool


async def crunch_after(n: int) -> None:
    result, pid = await asyncio.get_running_loop().run_in_executor(pool(), crunch, n)
    note(f"crunched {n} = {result} in process {pid}")


def app(environ, start_response):
    n = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["100000"])[0])
    defer(environ, crunch_after, n)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"crunching\n"]


application = DeferredMiddleware(app)
