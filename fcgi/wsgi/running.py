"""The requests a worker has taken and not yet ended, with the thread running each.

The loop adds them, request threads start and end them, the watchdog looks at them
(and gives up on one past --request-timeout), and a stop counts them from its timer:
four kinds of thread, so every change and every look is made under one lock.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Request


class Running:
    """Requests taken and not ended (thread 0 while queued), and those given up on whose
    thread has not come back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[Request, int] = {}
        self._given_up: set[Request] = set()

    def __len__(self) -> int:
        return len(self._threads)

    def queued(self, request: Request) -> None:
        with self._lock:
            self._threads[request] = 0

    def started(self, request: Request, thread: int) -> None:
        with self._lock:
            self._threads[request] = thread

    def ended(self, request: Request) -> None:
        """Its thread is done with it (after its end, or long after it was given up on)."""
        with self._lock:
            self._threads.pop(request, None)
            self._given_up.discard(request)

    def give_up(self, request: Request) -> bool:
        """Take ``request`` out as ended by the worker (its thread may never return);
        False if it ended on its own first."""
        with self._lock:
            if self._threads.pop(request, None) is None:
                return False
            self._given_up.add(request)
            return True

    def snapshot(self) -> dict[Request, int]:
        """Each running request and its thread (0: queued), at this moment."""
        with self._lock:
            return dict(self._threads)

    def given_up(self) -> list[Request]:
        """Requests given up on whose thread still runs in the app."""
        with self._lock:
            return list(self._given_up)
