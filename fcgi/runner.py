"""Request runners: the threads that call the WSGI application.

The I/O loop never runs application code; it hands each complete request to
the runner. A fixed set of ``threads`` serve requests. A request that calls
``fcgi.finish_request`` while the app is still running (PHP style) has told
us the rest is background work, so its thread leaves the serving set and a
fresh one takes its place, up to ``max_detached`` at once: post-finish work
does not shrink the capacity to answer visitors, PHP-FPM's pool-exhaustion
fault.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger("fcgi")


class ThreadRunner:
    """Runs ready requests on ``threads`` threads, replacing those that detach."""

    def __init__(self, handle: Callable[[Request], None], threads: int, max_detached: int) -> None:
        self.handle = handle
        self.threads = threads
        self.max_detached = max_detached
        self.detached = 0
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._workers: set[threading.Thread] = set()
        self._seq = 0

    def start(self) -> None:
        for _ in range(self.threads):
            self._spawn()

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def detach(self) -> None:
        """Called on a request's thread when it finished early: hand its place to a new thread."""
        with self._lock:
            if self.detached >= self.max_detached or getattr(self._local, "detached", False):
                return
            self.detached += 1
        self._local.detached = True
        self._spawn()

    def stop(self, deadline: float) -> bool:
        """Run what is queued, then end every thread; False if some were still busy at deadline."""
        for _ in range(self.threads):
            self._queue.put(None)
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in workers)

    def _spawn(self) -> None:
        with self._lock:
            self._seq += 1
            worker = threading.Thread(target=self._work, name=f"request-{self._seq}", daemon=True)
            self._workers.add(worker)
        worker.start()

    def _work(self) -> None:
        local = self._local
        local.detached = False
        try:
            while True:
                request = self._queue.get()
                if request is None:
                    return
                request.on_early_finish = self.detach
                self.handle(request)
                if local.detached:
                    with self._lock:
                        self.detached -= 1
                    return
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())
