"""The slow-request log and the request timeout: PHP-FPM's ``request_slowlog_timeout``
and ``request_terminate_timeout`` for this worker.

A daemon thread looks at the running requests every half second (or half the
shorter limit) and logs, once per request, the stack of any that has run
longer than ``--slow-request`` seconds: where it is stuck, while it is stuck.
A request past ``--request-timeout`` is handed to ``on_timeout`` with its
stack, to give up on it.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

log = logging.getLogger("fcgi.slow")


class Watchdog:
    """Logs the stack of requests running past ``limit`` (counted in ``slow``); hands
    those past ``timeout`` to ``on_timeout`` with their stack, to give up on them."""

    def __init__(
        self,
        running: Callable[[], Mapping[Any, int]],
        limit: float,
        timeout: float = 0.0,
        on_timeout: Callable[[Any, float, int, str], None] | None = None,
    ) -> None:
        self.running = running  # () -> each running request and its thread (0: queued)
        self.limit = limit
        self.timeout = timeout
        self.on_timeout = on_timeout
        self._stop = threading.Event()
        self.slow = 0
        self._reported: set[int] = set()
        self._thread = threading.Thread(target=self._watch, name="slow-request", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(0.5, min(x for x in (self.limit, self.timeout) if x) / 2)
        while not self._stop.wait(period):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        frames = None
        running = self.running()
        for request, thread_id in running.items():
            if not thread_id:
                continue  # queued, not started
            started = request.started
            if self.timeout and now - started >= self.timeout and self.on_timeout:
                frames = frames or thread_frames()
                self.on_timeout(request, now - started, thread_id, _stack(frames, thread_id))
                continue
            key = id(request)
            if not self.limit or now - started < self.limit or key in self._reported:
                continue
            self._reported.add(key)
            self.slow += 1
            frames = frames or thread_frames()
            log.warning(
                "slow request: %s running for %.1f s, thread %d:\n%s",
                request,
                now - started,
                thread_id,
                _stack(frames, thread_id),
            )
        alive = {id(r) for r in running}
        self._reported &= alive


def _stack(frames: dict[int, FrameType], thread_id: int) -> str:
    frame = frames.get(thread_id)
    return "".join(traceback.format_stack(frame)).rstrip() if frame else "(stack unavailable)"


def thread_frames() -> dict[int, FrameType]:
    """``sys._current_frames()`` with the collector paused: before CPython 3.11.9 and
    3.12.3 a collection inside it could deadlock the interpreter (CPython gh-106883).
    (wsgi_app's executor has the same guard: the two packages do not import each other.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        if enabled:
            gc.enable()
