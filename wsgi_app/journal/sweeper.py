"""A worker's journal thread: moves its log into SQLite, beats, and takes calls over."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from ..runtime.cpus import background
from .log import MOVE_EVERY
from .store import HEARTBEAT, POLL, Journal, Row

log = logging.getLogger("wsgi_app.deferred")


class Sweeper:
    """A worker's background thread: every ``MOVE_EVERY`` it moves its log into SQLite,
    every ``HEARTBEAT`` it says it is alive, and, once ``serve()`` says the app is
    being served, every ``POLL`` (at each turn while there is more) it claims free
    calls of its app, as many requests as ``room()`` says the executor can start now,
    and hands each request's rows to ``run``. A process that only imports the app (a
    reload's import check, a shell) takes nobody's calls."""

    def __init__(
        self,
        journal: Journal,
        run: Callable[[list[Row]], None],
        room: Callable[[], int] = lambda: 128,
    ) -> None:
        self.journal = journal
        self.run = run
        self.room = room
        self._pid = 0
        self._serving = threading.Event()  # claims may begin
        self._stop = threading.Event()  # no more claims
        self._end = threading.Event()  # no more moves either: the thread ends

    def start(self) -> None:
        """Start (once per process: again in a forked child)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._serving = threading.Event()
        self._stop = threading.Event()
        self._end = threading.Event()
        threading.Thread(target=self._loop, name="deferred-journal", daemon=True).start()

    def serve(self) -> None:
        """The app is being served in this process (the worker's startup, or a first
        request): take calls over from now on."""
        self.start()
        self._serving.set()

    def stop(self, _seconds_left: float = 0.0) -> int:
        """Stop claiming (a drain hook: abandons nothing, the journal keeps it all). The
        thread goes on moving the log and beating while the process lives: a call that
        ends during the drain must leave the log, or a kill then would run it again."""
        self._stop.set()
        return 0

    def close(self) -> None:
        """End the thread (a test, or an app done with this journal)."""
        self._stop.set()
        self._end.set()

    def _loop(self) -> None:
        background()
        beat = looked = failed = 0.0
        more = False  # the last look found calls: look again at the next turn
        while not self._end.is_set():
            try:
                self.journal.move()
            except Exception:  # the heartbeat goes on: others must not take this worker's
                if time.monotonic() - failed >= HEARTBEAT:  # once a beat: a full disk
                    failed = time.monotonic()  # is no place for 4 tracebacks a second
                    log.exception("deferred journal %s: moving the log failed", self.journal.path)
            try:
                now = time.monotonic()
                if now - beat >= HEARTBEAT:
                    self.journal.heartbeat()
                    self.journal.checkpoint()
                    beat = now
                if self._stop.is_set() or not self._serving.is_set():
                    continue
                room = max(0, self.room())
                if now - looked < POLL and not (more and room):
                    continue
                looked = now
                groups = self.journal.claim(room)  # 0: only a gone worker's log read in
                for rows in groups:
                    self.run(rows)
                more = bool(groups)
            except Exception:
                log.exception("deferred journal %s: claiming failed", self.journal.path)
            finally:
                self._end.wait(MOVE_EVERY)
