"""Where deferred work runs: a bounded executor owned by the worker process.

Each request's callables form a ``Batch`` that runs in registration order.
Batches run as tasks on one asyncio loop in a background thread, so
coroutine functions interleave without a thread each; plain functions go to
a small thread pool of their own, never to the threads serving requests.

Bounds: at most ``concurrency`` batches in progress, at most ``threads``
plain functions at once, at most ``backlog`` calls waiting. When the backlog
is full the policy is caller-runs: the thread that finished the request runs
its batch itself, after the response has gone out, which slows that worker's
intake instead of dropping work or growing memory without limit. Each
overflow is logged and counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import logging
import math
import os
import selectors
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

log = logging.getLogger("wsgi_app.deferred")

_REPR_LIMIT = 80
TICK = 0.02  # seconds: how often a busy loop takes new work and fires timers
SLOW_CHECK = 0.25  # seconds between looks for slow calls, when --slow-deferred is on


class _TickSelector(selectors.DefaultSelector):
    """Rounds the loop's sleeps up to whole ticks, so timers due close together
    (hundreds of ``asyncio.sleep`` ending each second) fire in one wake-up."""

    def select(self, timeout: float | None = None):
        if timeout is not None and timeout > 0:
            timeout = math.ceil(timeout / TICK) * TICK
        return super().select(timeout)


@dataclass(eq=False)
class Call:
    """One deferred callable with its arguments."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    thread: int | None = None  # the pool thread running it, for a plain function
    reported: bool = False  # already in the slow log

    def describe(self) -> str:
        name = getattr(self.func, "__qualname__", None) or repr(self.func)
        args = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = ", ".join(args)
        if len(text) > _REPR_LIMIT:
            text = text[: _REPR_LIMIT - 3] + "..."
        return f"{name}({text})"


@dataclass(eq=False)
class Batch:
    """The calls one request registered, and where that request came from."""

    origin: str
    calls: list[Call] = field(default_factory=list)
    started: int = 0  # calls begun so far; those after it are still waiting
    failed: int = 0
    began: float = 0.0
    task: Any = None
    on_done: Callable[[int, float, int], None] | None = None  # (count, seconds, failures)
    on_call_end: Callable[[int, BaseException | None], None] | None = None  # (index, error)

    def ended(self, index: int, error: BaseException | None) -> None:
        """Report the end of call ``index`` (not a cancelled one) to the journal, if any."""
        if self.on_call_end is not None:
            try:
                self.on_call_end(index, error)
            except Exception:
                log.exception("recording the end of deferred work of %s failed", self.origin)

    def done(self) -> None:
        """Report the batch's end to whoever asked (the server's access log)."""
        if self.on_done is not None and self.calls:
            try:
                self.on_done(len(self.calls), time.monotonic() - self.began, self.failed)
            except Exception:
                log.exception("reporting deferred work of %s failed", self.origin)


class DeferredExecutor:
    """Runs batches after their responses, within fixed bounds; see the module docstring."""

    def __init__(
        self,
        threads: int = 4,
        concurrency: int = 100,
        backlog: int = 1000,
        slow: float = 0,
        timeout: float = 0,
    ) -> None:
        self.threads = threads
        self.concurrency = concurrency
        self.backlog = backlog
        self.slow = slow  # seconds before a running call's stack is logged; 0: never
        self.timeout = timeout  # seconds before a coroutine is cancelled; 0: never
        self.stats = dict.fromkeys(
            ("queued", "running", "done", "failed", "overflowed", "abandoned", "slow"), 0
        )
        self._running: dict[Call, tuple[Batch, float, Any]] = {}  # call: (batch, start, task)
        self.last_duration = 0.0
        self._lock = threading.Condition()
        self._batches: set[Batch] = set()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._overflow_logged_at = -1.0
        self._overflow_unlogged = 0
        self._inbox: list[Batch] = []
        self._idle = True
        self._watching = False  # a slow-call check is scheduled
        self._closed = False

    def configure(self, slow: float | None = None, timeout: float | None = None) -> None:
        """Set the slow-log and timeout limits (the worker offers its own through the environ)."""
        if slow is not None:
            self.slow = slow
        if timeout is not None:
            self.timeout = timeout

    # -- taking work ----------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        """Queue ``batch``; when the backlog is full or we are draining, run it here and now."""
        with self._lock:
            overflow = self._closed or self.stats["queued"] + len(batch.calls) > self.backlog
            if not overflow:
                self._start()
                self.stats["queued"] += len(batch.calls)
                self._batches.add(batch)
            else:
                self.stats["overflowed"] += len(batch.calls)
        if overflow:
            self._warn_overflow(batch)
            self._run_here(batch)
            return
        with self._lock:
            self._inbox.append(batch)
            if not self._idle:
                return  # the loop's next tick takes it
            self._idle = False
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._tick)

    def _warn_overflow(self, batch: Batch) -> None:
        """Log an overflow; under sustained overload, one line a second with the count."""
        now = time.monotonic()
        with self._lock:
            self._overflow_unlogged += 1
            if now - self._overflow_logged_at < 1.0:
                return
            count, self._overflow_unlogged = self._overflow_unlogged, 0
            self._overflow_logged_at = now
        reason = "stopping" if self._closed else f"backlog of {self.backlog} full"
        log.warning(
            "deferred %s: running %d batch(es) on the request thread, latest %d call(s) from %s",
            reason,
            count,
            len(batch.calls),
            batch.origin,
        )

    def _start(self) -> None:
        """Start the loop thread and pool in this process (again after a fork)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._closed = False
        self._batches.clear()
        self._inbox.clear()
        self._idle = True
        self._watching = False
        self._loop = asyncio.SelectorEventLoop(_TickSelector())
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, "deferred")
        self._slots = asyncio.Semaphore(self.concurrency)
        threading.Thread(target=self._loop.run_forever, name="deferred-loop", daemon=True).start()

    def _tick(self) -> None:
        """On the loop: start the batches that arrived; tick again while they keep coming.

        Under a stream of submissions the loop picks them up every ``TICK`` instead of
        being woken for each: a wake-up is a pipe write and a GIL hand-off that the
        serving threads pay for. When a tick finds nothing new, the loop sleeps until
        ``submit`` wakes it (or a timer of running work fires).
        """
        assert self._loop is not None
        with self._lock:
            arrived = list(self._inbox)
            self._inbox.clear()
            self._idle = not arrived
        for batch in arrived:
            batch.task = self._loop.create_task(self._run_batch(batch))
        if self.slow and arrived and not self._watching:
            self._watching = True
            self._loop.call_later(SLOW_CHECK, self._watch_slow)
        if arrived:
            self._loop.call_later(TICK, self._tick)

    def _watch_slow(self) -> None:
        """While calls run, look for slow ones every ``SLOW_CHECK`` seconds."""
        assert self._loop is not None
        self._check_slow()
        self._watching = bool(self._running or self._batches)
        if self._watching:
            self._loop.call_later(SLOW_CHECK, self._watch_slow)

    # -- running work -----------------------------------------------------------------

    async def _run_batch(self, batch: Batch) -> None:
        assert self._slots is not None and self._loop is not None
        try:
            async with self._slots:
                batch.began = time.monotonic()
                for index, call in enumerate(batch.calls):
                    with self._lock:
                        batch.started += 1
                        self.stats["queued"] -= 1
                        self.stats["running"] += 1
                    began = time.monotonic()
                    self._running[call] = (batch, began, asyncio.current_task())
                    try:
                        if inspect.iscoroutinefunction(call.func):
                            await self._awaited(call.func(*call.args, **call.kwargs))
                        else:
                            result = await self._loop.run_in_executor(self._pool, _invoke, call)
                            if inspect.isawaitable(result):
                                await self._awaited(result)
                    except asyncio.CancelledError:  # drain() has counted it as abandoned
                        with self._lock:
                            self.stats["running"] -= 1
                        raise
                    except TimeoutError as exc:
                        batch.failed += 1
                        self._count(began, "failed")
                        log.error(
                            "deferred %s cancelled after %g s (request %s)",
                            call.describe(),
                            self.timeout,
                            batch.origin,
                        )
                        batch.ended(index, exc)
                    except Exception as exc:
                        batch.failed += 1
                        self._count(began, "failed")
                        log.exception(
                            "deferred %s failed (request %s)", call.describe(), batch.origin
                        )
                        batch.ended(index, exc)
                    else:
                        self._count(began, "done")
                        batch.ended(index, None)
                    finally:
                        self._running.pop(call, None)
                batch.done()
        finally:
            with self._lock:
                self._batches.discard(batch)
                self._lock.notify_all()

    async def _awaited(self, awaitable: Any) -> Any:
        if self.timeout:
            return await asyncio.wait_for(awaitable, self.timeout)
        return await awaitable

    def _check_slow(self) -> None:
        """On the loop, every ``SLOW_CHECK`` s while work runs: log calls past ``slow``."""
        if not self.slow:
            return
        now = time.monotonic()
        frames = None
        for call, (batch, began, task) in list(self._running.items()):
            if now - began < self.slow or call.reported:
                continue
            call.reported = True
            if call.thread is not None:
                frames = frames or _thread_frames()
                frame = frames.get(call.thread)
                stack = traceback.format_stack(frame) if frame else []
            else:  # a coroutine: the frames down its chain of awaits
                chain = [(f, f.f_lineno) for f in task.get_stack(limit=20)]
                stack = traceback.format_list(traceback.StackSummary.extract(chain))
            with self._lock:
                self.stats["slow"] += 1
            log.warning(
                "slow deferred %s running for %.1f s (request %s):\n%s",
                call.describe(),
                now - began,
                batch.origin,
                "".join(stack).rstrip(),
            )

    def _count(self, began: float, outcome: str) -> None:
        with self._lock:
            self.stats["running"] -= 1
            self.stats[outcome] += 1
            self.last_duration = time.monotonic() - began

    def _run_here(self, batch: Batch) -> None:
        batch.began = time.monotonic()
        for index, call in enumerate(batch.calls):
            began = time.monotonic()
            with self._lock:
                self.stats["running"] += 1
            try:
                result = _invoke(call)
                if inspect.isawaitable(result):
                    asyncio.run(self._awaited(result))
            except Exception as exc:
                batch.failed += 1
                self._count(began, "failed")
                log.exception("deferred %s failed (request %s)", call.describe(), batch.origin)
                batch.ended(index, exc)
            else:
                self._count(began, "done")
                batch.ended(index, None)
        batch.done()

    # -- stopping ------------------------------------------------------------------------

    def drain(self, timeout: float) -> int:
        """Finish accepted work for up to ``timeout`` seconds; log and count what is left.

        Work submitted from now on runs on the submitting thread. Returns how many
        calls were abandoned (never started, or still running at the deadline).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            while self._batches and self._pid == os.getpid():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            if self._pid != os.getpid():
                return 0
            leftover = list(self._batches)
        abandoned = 0
        for batch in leftover:
            for index, call in enumerate(batch.calls):
                if index < batch.started - 1:
                    continue
                state = "still running" if index == batch.started - 1 else "never started"
                log.error(
                    "deferred %s abandoned at stop, %s (request %s)",
                    call.describe(),
                    state,
                    batch.origin,
                )
                abandoned += 1
            if batch.task is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(batch.task.cancel)
        with self._lock:
            self.stats["abandoned"] += abandoned
            self.stats["queued"] = 0
        return abandoned

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.stats, "last_duration": round(self.last_duration, 6)}


def _invoke(call: Call) -> Any:
    call.thread = threading.get_ident()  # where the slow log finds its stack
    return call.func(*call.args, **call.kwargs)


def _thread_frames() -> dict[int, FrameType]:
    """``sys._current_frames()`` with the collector paused: before CPython 3.11.9 and
    3.12.3 a collection inside it could deadlock the interpreter (CPython gh-106883).
    (The same guard as fcgi.watchdog's; the two packages do not import each other.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        if enabled:
            gc.enable()
