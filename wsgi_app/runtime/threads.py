"""An elastic pool of daemon threads for deferred plain functions.

It grows a thread when work waits and no thread is idle, up to ``max_threads``;
a thread idle for ``idle_timeout`` seconds ends. Blocking calls (``time.sleep``,
``requests.post``) spend their time outside the GIL, so many overlap for the
price of their memory, not of CPU. Work beyond ``max_threads`` waits in arrival
order.

Hand-offs are batched: a thread that ends a call takes the next waiting one
without sleeping, so under a stream of calls most start that way, with no wake
at all. A submission wakes an idle thread itself only when no thread is busy
(nobody would come by); otherwise waiting work is handed out by a pickup timer,
``pickup`` seconds later at most, to idle or new threads. Waking a sleeping
thread for each call cost a deferred call four times the context switches (13
against 3 per call, hello world with one request in twenty deferring 0.1 s).

The threads are daemon threads: a call that never returns cannot hold the
process at exit (``concurrent.futures`` joins its threads at exit, which is why
a stop once waited for a 25 s sleep). A thread that dies anyway (an exception
the caller's own guard did not catch) is logged and replaced.

The threads run as background work for the kernel (``cpus.background()``): they
take their share of the CPU without preempting the thread that serves requests.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from .cpus import background

log = logging.getLogger("wsgi_app.deferred")

PICKUP = 0.01  # seconds waiting work waits for a busy thread before an idle one is woken


class ElasticPool:
    """Runs ``run(item)`` for each submitted item on up to ``max_threads`` threads."""

    def __init__(
        self,
        run: Callable[[Any], None],
        max_threads: int,
        idle_timeout: float = 10.0,
        name: str = "deferred",
        pickup: float = PICKUP,
    ) -> None:
        self._run = run
        self.max_threads = max_threads
        self.idle_timeout = idle_timeout
        self.name = name
        self.pickup = pickup
        self._pending: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)  # idle threads wait here
        self._timer_armed = threading.Condition(self._lock)  # the pickup timer waits here
        self.threads = 0  # alive
        self._busy = 0  # running an item: each takes the next waiting one when it ends
        self._coming = 0  # woken or started for an item, not yet back under the lock
        # one mark per thread waiting in _work_ready, in the order it wakes them
        self._sleepers: collections.deque[list[bool]] = collections.deque()
        self._armed = False  # the pickup timer will hand out what waits
        self._timer = False  # the pickup timer's thread runs
        self._seq = 0
        self._closed = False

    def submit(self, item: Any) -> None:
        """Queue ``item``; hand it to a thread now if none is busy, else within ``pickup``."""
        with self._lock:
            self._pending.append(item)
            if not self._busy:
                self._hand_out()
            elif not self._armed:
                self._armed = True
                if self._timer:
                    self._timer_armed.notify()
                else:
                    self._timer = True
                    self._start(self._pickup_timer, "pickup")

    @property
    def waiting(self) -> int:
        """Items not yet taken by a thread."""
        return len(self._pending)

    def close(self) -> None:
        """Let idle threads end now; busy ones end once nothing waits."""
        with self._lock:
            self._closed = True
            self._work_ready.notify_all()
            self._timer_armed.notify_all()

    def _hand_out(self) -> None:
        """Under ``_lock``: wake an idle thread, or start one, for each waiting item."""
        wanted = len(self._pending) - self._coming
        if wanted <= 0:
            return
        woken = min(wanted, len(self._sleepers))
        self._coming += woken
        for _ in range(woken):
            self._sleepers.popleft()[0] = True  # in the order _work_ready wakes them
        if woken:
            self._work_ready.notify(woken)
        for _ in range(min(wanted - woken, self.max_threads - self.threads)):
            self.threads += 1
            self._coming += 1
            self._start(self._work, "")

    def _start(self, target: Callable[[], None], role: str) -> None:
        """Start a thread (under ``_lock``)."""
        self._seq += 1
        name = f"{self.name}-{role or self._seq}"
        threading.Thread(target=target, name=name, daemon=True).start()

    def _pickup_timer(self) -> None:
        """While work waits with threads busy: hand it out every ``pickup`` seconds."""
        background()
        with self._lock:
            while not self._closed:
                if not self._armed:
                    self._timer_armed.wait()
                    continue
                self._timer_armed.wait(self.pickup)
                self._armed = False
                if self._pending:
                    self._hand_out()
            self._timer = False

    def _work(self) -> None:
        background()
        with self._lock:
            self._coming -= 1
        try:
            while self._next():
                pass
        except BaseException:
            log.exception("deferred pool thread %s died; starting a new one", self.name)
            with self._lock:
                self._busy -= 1
                if self._closed:
                    self.threads -= 1
                else:
                    self._coming += 1  # the same count of threads: a new one in its place
                    self._start(self._work, "")

    def _next(self) -> bool:
        """Take and run one item; False when this thread should end."""
        with self._lock:
            while not self._pending:
                if self._closed:
                    self.threads -= 1
                    return False
                handed = [False]  # set by _hand_out when it wakes this thread
                self._sleepers.append(handed)
                self._work_ready.wait(self.idle_timeout)
                if handed[0]:
                    self._coming -= 1
                else:  # idle past the timeout, or the pool closed
                    self._sleepers.remove(handed)
                    if not self._pending:
                        self.threads -= 1
                        return False
            item = self._pending.popleft()
            self._busy += 1
        self._run(item)
        with self._lock:
            self._busy -= 1
        return True
