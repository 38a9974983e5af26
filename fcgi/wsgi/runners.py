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

A lazy result (a generator, a stream) on the inline runner is iterated where
it is, on the loop's thread: most (a framework's response object) end within
microseconds. One that is still going ``STREAM_GRACE`` later has the loop
moved to a new thread beneath it by the runner's minder thread, so a stream
never holds the loop (the worker goes on answering, and sees the visitor
leave); it then counts as detached. A request ``--request-timeout`` gave up
on is abandoned: its thread is never waited for again, and one that holds the
loop has it moved the same way.
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
# Move the I/O loop off the given thread (the one running it) to a new thread; False
# if that thread does not run the loop (any more).
HandOver = Callable[[int], bool]

log = logging.getLogger("fcgi")

STREAM_GRACE = 0.02  # seconds a lazy result may keep the loop's thread before the loop moves
_DOZE_AFTER = 1.0  # seconds without a lazy result before the minder sleeps until the next


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
        return self._count(request)

    def _count(self, request: Request) -> bool:
        with self._cond:
            if self.detached >= self.max_detached:
                return False
            self.detached += 1
            request.detached = True
        return True

    def _release(self, request: Request) -> bool:
        """After a request (or when it is abandoned): True if it had detached, and is no
        longer counted."""
        if not request.detached:
            return False
        with self._cond:
            if not request.detached:  # abandoned from another thread meanwhile
                return False
            request.detached = False
            self.detached -= 1
            self._cond.notify_all()
        return True

    def _wait_detached(self, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self.detached, _left(deadline))


class InlineRunner(_Detaching):
    """Runs each request on the I/O loop's thread; a detaching request takes the
    thread with it and the loop moves to a new one (``hand_over_loop``), as it does
    beneath a lazy result still going after ``STREAM_GRACE`` (the minder)."""

    def __init__(self, handle: Handle, max_detached: int, hand_over_loop: HandOver) -> None:
        super().__init__(handle, max_detached)
        self.hand_over_loop = hand_over_loop
        # The loop moves from one thread at a time; a request leaving the loop's thread
        # waits here while another thread decides to move the loop from beneath it.
        self._moving = threading.Lock()
        self._taking = False  # another thread holds _moving to move the loop
        self._streaming: Request | None = None  # the latest lazy result on the loop's thread
        self._streaming_since = 0.0
        self._dozing = False  # the minder sleeps until _stirred
        self._stirred = threading.Event()
        self._stop = threading.Event()
        self._told_full = False
        self._on_early_finish = self.detach  # bound once: stored on every request
        self._on_stream = self.stream

    def start(self) -> None:
        threading.Thread(target=self._mind, name="fcgi-streams", daemon=True).start()

    def submit(self, request: Request) -> None:
        request.on_early_finish = self._on_early_finish
        request.on_stream = self._on_stream
        try:
            self.handle(request)
        finally:
            # handle() has cleared request.thread; a thread deciding to move the loop
            # from beneath this request either sees that or is waited for here, before
            # this thread goes back to the loop's work.
            if self._taking:
                with self._moving:
                    pass
            self._release(request)

    def detach(self, request: Request) -> None:
        with self._moving:
            if self._claim(request) and not self.hand_over_loop(request.thread):
                self._release(request)

    def stream(self, request: Request) -> None:
        """A lazy result is about to be iterated on the loop's thread: the minder moves
        the loop if it is still going ``STREAM_GRACE`` from now."""
        self._streaming_since = time.monotonic()
        self._streaming = request
        if self._dozing:
            self._dozing = False
            self._stirred.set()

    def abandon(self, request: Request) -> None:
        """``request`` is given up on (``--request-timeout``) and its thread may never
        return: it is no longer counted, and if it holds the loop the loop moves."""
        self._take(request, count=False)
        self._release(request)

    def _take(self, request: Request, count: bool) -> bool:
        """From another thread: move the loop off ``request``'s thread if it is running
        the loop, counting the request as detached when ``count``."""
        with self._moving:
            self._taking = True
            try:
                if not request.thread or request.detached:
                    return False  # ended, or already off the loop's thread
                if count and not self._count(request):
                    if not self._told_full:
                        self._told_full = True
                        log.warning(
                            "%s: a lazy response keeps the I/O loop's thread: %d requests "
                            "already run off it (--max-detached); the worker answers others "
                            "when it ends (raise --max-detached, or use --threads)",
                            request,
                            self.detached,
                        )
                    return False
                if self.hand_over_loop(request.thread):
                    return True
                if count:
                    self._release(request)
                return False
            finally:
                self._taking = False

    def _mind(self) -> None:
        """Every half STREAM_GRACE while lazy results come, move the loop off one that has
        kept it too long; asleep until the next after a second with none."""
        period = STREAM_GRACE / 2
        seen = 0.0
        while not self._stop.is_set():
            self._dozing = True
            self._stirred.clear()
            if self._streaming_since == seen:  # else one came meanwhile: no sleep
                self._stirred.wait()
            self._dozing = False
            seen, quiet_since = self._streaming_since, time.monotonic()
            while not self._stop.wait(period):
                since, request = self._streaming_since, self._streaming
                now = time.monotonic()
                on_loop = request is not None and request.thread and not request.detached
                if on_loop and now - since >= STREAM_GRACE:
                    on_loop = not self._take(request, count=True)  # type: ignore[arg-type]
                if since != seen or on_loop:
                    seen, quiet_since = since, now
                elif now - quiet_since >= _DOZE_AFTER:
                    break

    def stop(self, deadline: float) -> bool:
        done = self._wait_detached(deadline)
        self._stop.set()
        self._stirred.set()
        return done


class ThreadRunner(_Detaching):
    """Runs requests on ``--threads`` threads, replacing those that detach or are
    abandoned."""

    def __init__(self, handle: Handle, max_detached: int, threads: int) -> None:
        super().__init__(handle, max_detached)
        self.threads = threads
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._workers: set[threading.Thread] = set()
        self._abandoned: set[int] = set()  # threads given up on: they leave if they return
        self._seq = 0
        self._on_early_finish = self.detach  # bound once: stored on every request

    def start(self) -> None:
        for _ in range(self.threads):
            self._spawn()

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def detach(self, request: Request) -> None:
        if self._claim(request):
            self._spawn()

    def abandon(self, request: Request) -> None:
        """``request`` is given up on (``--request-timeout``): its thread is no longer
        waited for at a stop and leaves if it ever returns; a fresh thread takes its
        place in the pool (a detached one was replaced already)."""
        thread = request.thread
        if not thread:
            return
        with self._cond:
            self._abandoned.add(thread)
            self._workers = {w for w in self._workers if w.ident != thread}
            self._cond.notify_all()  # a stop waits for the others only
        if not self._release(request):
            self._spawn()

    def stop(self, deadline: float) -> bool:
        """Run what is queued, then end every thread; False if some were busy at the
        deadline. A thread given up on meanwhile (``abandon``) is no longer waited for."""
        for _ in range(self.threads):
            self._queue.put(None)
        with self._cond:
            return self._cond.wait_for(lambda: not self._workers, _left(deadline))

    def _spawn(self) -> None:
        with self._cond:  # started before a stop can see it: join() refuses one not started
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
                request.on_early_finish = self._on_early_finish
                self.handle(request)
                if self._release(request):
                    return  # a fresh thread has taken this one's place
                if self._abandoned and threading.get_ident() in self._abandoned:
                    with self._cond:  # its id may be given to a new thread once it ends
                        self._abandoned.discard(threading.get_ident())
                    return  # given up on, and replaced
        finally:
            with self._cond:
                self._workers.discard(threading.current_thread())
                self._cond.notify_all()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
