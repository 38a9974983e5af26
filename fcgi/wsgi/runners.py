"""Request runners: where the I/O loop's complete requests call the application.

``InlineRunner`` (``--threads 1``, the default) calls the app on the loop's
own thread: no hand-off to another thread, no wake-up, which is most of the
cost of a small request. ``ThreadRunner`` (``--threads N``) queues requests to
N threads.

Either way, a request that calls ``fcgi.finish_request`` while the app is
still running (PHP style) has said the rest is background work, so it stops
counting against ``--threads``: the inline runner hands the I/O loop to a new
thread, the thread runner starts a new serving thread, up to
``--max-detached`` at once. Post-finish work never shrinks the capacity to
answer visitors, which is PHP-FPM's pool-exhaustion fault.
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

Handle = Callable[["Request"], None]

log = logging.getLogger("fcgi")


class _Detaching:
    """Counting detached requests, shared by both runners."""

    def __init__(self, handle: Handle, max_detached: int) -> None:
        self.handle = handle
        self.max_detached = max_detached
        self.detached = 0
        self._cond = threading.Condition()

    def _claim(self, request: Request) -> bool:
        """Count ``request`` as detached, if the limit allows. Only the thread serving
        the request detaches it: a finish from a thread of the app's own would count a
        thread that never releases (and a stop would wait for it in vain)."""
        if request.detached or request.thread != threading.get_ident():
            return False
        with self._cond:
            if self.detached >= self.max_detached:
                return False
            self.detached += 1
        request.detached = True
        return True

    def _release(self, request: Request) -> bool:
        """After a request: True if it had detached (and is no longer counted)."""
        if not request.detached:
            return False
        request.detached = False
        with self._cond:
            self.detached -= 1
            self._cond.notify_all()
        return True

    def _wait_detached(self, deadline: float) -> bool:
        with self._cond:
            while self.detached:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class InlineRunner(_Detaching):
    """Runs each request on the I/O loop's thread; a detaching request takes the
    thread with it and the loop moves to a new one (``hand_over_loop``)."""

    def __init__(self, handle: Handle, max_detached: int, hand_over_loop: Callable[[], bool]):
        super().__init__(handle, max_detached)
        self.hand_over_loop = hand_over_loop

    def start(self) -> None:
        pass

    def submit(self, request: Request) -> None:
        request.on_early_finish = self.detach
        try:
            self.handle(request)
        finally:
            self._release(request)

    def detach(self, request: Request) -> None:
        if self._claim(request) and not self.hand_over_loop():
            self._release(request)

    def stop(self, deadline: float) -> bool:
        return self._wait_detached(deadline)


class ThreadRunner(_Detaching):
    """Runs requests on ``--threads`` threads, replacing those that detach."""

    def __init__(self, handle: Handle, max_detached: int, threads: int) -> None:
        super().__init__(handle, max_detached)
        self.threads = threads
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._workers: set[threading.Thread] = set()
        self._seq = 0

    def start(self) -> None:
        for _ in range(self.threads):
            self._spawn()

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def detach(self, request: Request) -> None:
        if self._claim(request):
            self._spawn()

    def stop(self, deadline: float) -> bool:
        """Run what is queued, then end every thread; False if some were busy at the deadline."""
        for _ in range(self.threads):
            self._queue.put(None)
        with self._cond:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in workers)

    def _spawn(self) -> None:
        with self._cond:
            self._seq += 1
            worker = threading.Thread(target=self._work, name=f"request-{self._seq}", daemon=True)
            self._workers.add(worker)
        worker.start()

    def _work(self) -> None:
        try:
            while True:
                request = self._queue.get()
                if request is None:
                    return
                request.on_early_finish = self.detach
                self.handle(request)
                if self._release(request):
                    return  # a fresh thread has taken this one's place
        finally:
            with self._cond:
                self._workers.discard(threading.current_thread())
