"""An elastic pool of daemon threads for deferred plain functions.

It grows by one thread whenever work arrives and no thread is idle, up to
``max_threads``; a thread idle for ``idle_timeout`` seconds ends. Blocking
calls (``time.sleep``, ``requests.post``) spend their time outside the GIL, so
many overlap for the price of their memory, not of CPU. Work beyond
``max_threads`` waits in arrival order.

The threads are daemon threads: a call that never returns cannot hold the
process at exit (``concurrent.futures`` joins its threads at exit, which is why
a stop once waited for a 25 s sleep). A thread that dies anyway (an exception
the caller's own guard did not catch) is logged and replaced.

The threads run as background work for the kernel (``cpus.background()``): they
take their share of the CPU without preempting the thread that serves requests.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from .cpus import background

log = logging.getLogger("wsgi_app.deferred")

_STOP = object()


class ElasticPool:
    """Runs ``run(item)`` for each submitted item on up to ``max_threads`` threads."""

    def __init__(
        self,
        run: Callable[[Any], None],
        max_threads: int,
        idle_timeout: float = 10.0,
        name: str = "deferred",
    ) -> None:
        self._run = run
        self.max_threads = max_threads
        self.idle_timeout = idle_timeout
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.threads = 0  # alive
        self._idle = 0  # waiting for work and not yet promised any
        self._seq = 0
        self._closed = False

    def submit(self, item: Any) -> None:
        """Queue ``item``; wake an idle thread, or start one if none is idle."""
        with self._lock:
            self._queue.put(item)
            if self._idle:
                self._idle -= 1  # that thread will take it
            elif self.threads < self.max_threads:
                self._spawn()

    @property
    def waiting(self) -> int:
        """Items not yet taken by a thread."""
        return self._queue.qsize()

    def close(self) -> None:
        """Let idle threads end now; busy ones end after their current item."""
        with self._lock:
            self._closed = True
            for _ in range(self.threads):
                self._queue.put(_STOP)

    def _spawn(self) -> None:
        """Start one thread (under ``_lock``)."""
        self.threads += 1
        self._seq += 1
        threading.Thread(target=self._work, name=f"{self.name}-{self._seq}", daemon=True).start()

    def _work(self) -> None:
        background()
        try:
            while self._next():
                pass
        except BaseException:
            log.exception("deferred pool thread %s died; starting a new one", self.name)
            with self._lock:
                self.threads -= 1
                if not self._closed:
                    self._spawn()

    def _next(self) -> bool:
        """Take and run one item; False when this thread should end."""
        try:
            item = self._queue.get(timeout=self.idle_timeout)
        except queue.Empty:
            with self._lock:
                if self._queue.qsize():
                    return True  # work came as we timed out: a submitter counted on us
                self._idle -= 1
                self.threads -= 1
            return False
        if item is _STOP:
            with self._lock:
                self.threads -= 1
            return False
        self._run(item)
        with self._lock:
            self._idle += 1
        return True
