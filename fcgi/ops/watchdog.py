"""The slow-request log: PHP-FPM's ``request_slowlog_timeout`` for this worker.

A daemon thread looks at the running requests every half second and logs,
once per request, the stack of any that has run longer than
``--slow-request`` seconds: where it is stuck, while it is stuck.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from types import FrameType
from typing import Any

log = logging.getLogger("fcgi.slow")


class Watchdog:
    """Logs the stack of requests running past the limit; counts them in ``slow``."""

    def __init__(self, in_progress: Mapping[Any, int], limit: float) -> None:
        self.in_progress = in_progress  # running request -> the id of its thread (0: queued)
        self.limit = limit
        self._stop = threading.Event()
        self.slow = 0
        self._reported: set[int] = set()
        self._thread = threading.Thread(target=self._watch, name="slow-request", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(0.5, self.limit / 2)
        while not self._stop.wait(period):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        frames = None
        running = dict(self.in_progress)
        for request, thread_id in running.items():
            if not thread_id:
                continue  # queued, not started
            started = request.started
            key = id(request)
            if now - started < self.limit or key in self._reported:
                continue
            self._reported.add(key)
            self.slow += 1
            frames = frames or thread_frames()
            frame = frames.get(thread_id)
            stack = "".join(traceback.format_stack(frame)) if frame else "(stack unavailable)\n"
            log.warning(
                "slow request: %s running for %.1f s, thread %d:\n%s",
                request,
                now - started,
                thread_id,
                stack.rstrip(),
            )
        alive = {id(r) for r in running}
        self._reported &= alive


def thread_frames() -> dict[int, FrameType]:
    """``sys._current_frames()`` with the collector paused: before CPython 3.11.9 and
    3.12.3 a collection inside it could deadlock the interpreter (CPython gh-106883)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        if enabled:
            gc.enable()
