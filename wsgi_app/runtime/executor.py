"""Where deferred work runs: an executor owned by the worker process.

Each request's calls form a ``Batch`` that runs in registration order. A batch
whose next call is a plain function goes straight to an elastic pool of daemon
threads (``wsgi_app.pool``), which grows while calls block and shrinks when
idle; a batch whose next call is a coroutine function goes to one asyncio loop
in a background thread, where coroutines interleave without a thread each.
A batch that mixes both moves between the two as it goes.

Bounds: ``threads`` plain functions at once, ``concurrency`` batches on the
loop at once, and a ``backlog`` of waiting calls. Past the backlog, a batch is
still taken (never dropped, never run on the thread that served the request,
which with ``--threads 1`` is the worker's I/O loop): it waits its turn, and
each overflow is counted and logged, one line a second at most. What bounds
the wait then is memory (a few hundred bytes per waiting call plus its
arguments); a worker that overflows for long needs more ``threads``, or the
work belongs in a queue beyond the process (Celery).

With ``process=True`` a batch that pickles goes to a helper process instead
(``wsgi_app.helper``), which runs it on an executor of its own and reports each
start and end back here, where the counts stay.

Every call ends exactly once, as done, failed or abandoned (``wsgi_app.calls``).
Each runs inside the context it was deferred in (a plain function through
``Context.run``, a coroutine as a task of its own given that context), inside an
OpenTelemetry span when OpenTelemetry is installed (``wsgi_app.runtime.tracing``);
the lines logged about it carry its request id and trace id as ``extra=`` fields.
Hooks for a journal: ``on_accept`` callbacks see each batch the executor
takes, ``on_start`` each call as it starts, ``on_end`` each call as it ends
(``call.state`` is its outcome).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
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
from types import FrameType, FunctionType
from typing import Any

from . import tracing
from .calls import Batch, Call, State
from .cpus import background
from .helper_process import Helper
from .threads import ElasticPool

log = logging.getLogger("wsgi_app.deferred")

TICK = 0.02  # seconds: how often a busy loop takes new work and fires timers
SLOW_CHECK = 0.25  # seconds between looks for slow calls, when ``slow`` is on
IDLE_TIMEOUT = 10.0  # seconds an idle pool thread waits for work before it ends
LATENCY_SAMPLES = 2000  # recent finish-to-start delays kept for ``start_delays()``
ABANDON_LINES = 100  # calls a stop names one by one; the rest are summed up per callable

Hook = Callable[..., None]


def _leave_forked_child(call: Call) -> None:
    """A call forked and its child returned here: it must not go on with the parent's
    work (every later call would run twice, once in each process), so it exits."""
    log.error(
        "deferred %s forked and its child (pid %d) returned into the executor; the child "
        "exits: end a child with os._exit()",
        call.describe(),
        os.getpid(),
    )
    logging.shutdown()
    os._exit(1)


class _TickSelector(selectors.DefaultSelector):
    """Rounds the loop's sleeps up to whole ticks, so timers due close together
    (hundreds of ``asyncio.sleep`` ending each second) fire in one wake-up."""

    def select(self, timeout: float | None = None):
        if timeout is not None and timeout > 0:
            timeout = math.ceil(timeout / TICK) * TICK
        return super().select(timeout)


class _Workers:
    """The threads of one executor in one process: the pool and the asyncio loop.

    A drain closes its workers; later work starts new ones (also after a fork).
    """

    def __init__(self, executor: DeferredExecutor) -> None:
        self.pid = os.getpid()
        self.pool = ElasticPool(
            lambda batch: executor._run_plain(self, batch), executor.threads, IDLE_TIMEOUT
        )
        self.loop = asyncio.SelectorEventLoop(_TickSelector())
        self.slots = asyncio.Semaphore(executor.concurrency)
        self.inbox: list[tuple[Batch, Any]] = []
        self.idle = True  # the loop sleeps until woken (no tick pending)
        self.watching = False  # a slow-call check is scheduled
        self.closed = False
        self.yield_every = sys.getswitchinterval()  # seconds: see DeferredExecutor.submit
        self.yielded = 0.0  # time.monotonic() of the serving threads' last sched_yield
        threading.Thread(target=self._serve, name="deferred-loop", daemon=True).start()

    def _serve(self) -> None:
        """Run the loop until closed; if something escapes it (a callback raising
        SystemExit), log it and go on with the same loop and its tasks."""
        background()
        while not self.closed:
            try:
                self.loop.run_forever()
            except BaseException:
                log.exception("the deferred loop failed; running it again")
        self.loop.close()

    def close(self) -> None:
        """Cancel what runs on the loop, stop it, and let idle pool threads end."""
        self.closed = True
        self.pool.close()

        def stop() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.stop)  # after the cancellations are delivered

        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(stop)


class DeferredExecutor:
    """Runs batches after their responses, within bounds; see the module docstring."""

    def __init__(
        self,
        threads: int = 512,
        concurrency: int = 1000,
        backlog: int = 1000,
        slow: float = 0,
        timeout: float = 0,
        process: bool = False,
    ) -> None:
        self.threads = threads
        self.process = process  # run picklable batches in a helper process (wsgi_app.helper)
        self.summary = True  # log the totals at a drain
        self.concurrency = concurrency
        self.backlog = backlog
        self.slow = slow  # seconds before a running call's stack is logged; 0: never
        self.timeout = timeout  # seconds before a coroutine is cancelled; 0: never
        self.stats = dict.fromkeys(
            ("queued", "running", "done", "failed", "abandoned", "overflowed", "skipped", "slow"), 0
        )
        self.registered = 0  # calls accepted, ever: done + failed + abandoned + queued + running
        self.last_duration = 0.0
        self.on_accept: list[Hook] = []  # hook(batch): the executor took it
        self.on_start: list[Hook] = []  # hook(batch, call): call started running
        self.on_end: list[Hook] = []  # hook(batch, call): call.state is its outcome
        self.tracer = tracing.tracer()  # each call's span comes from it; None: no spans
        # whether a call a stop abandons is kept elsewhere (a journal), so not named here
        self.keeps: Callable[[Call], bool] = lambda call: False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a batch ended
        self._draining = 0  # drains waiting on _changed (notified only when there are some)
        self._batches: set[Batch] = set()
        self._running: dict[Call, tuple[Batch, Any]] = {}  # call: (batch, its asyncio task)
        self._workers: _Workers | None = None
        self._helper: Helper | None = None
        self._helper_lock = threading.Lock()
        self._delays: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._overflow_logged_at = -1.0
        self._overflow_unlogged = 0

    def configure(self, slow: float | None = None, timeout: float | None = None) -> None:
        """Set the slow-log and timeout limits (the worker offers its own through the environ)."""
        if slow is not None:
            self.slow = slow
        if timeout is not None:
            self.timeout = timeout

    # -- taking work ----------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        """Take ``batch``: it starts as soon as a thread (or the loop) is free."""
        if not batch.calls:
            return
        helper = self._helper_here() if self.process else None
        with self._lock:
            workers = self._workers
            if workers is None or workers.pid != os.getpid():
                if workers is not None and workers.pid != os.getpid():
                    self._forget_parent()
                workers = self._workers = _Workers(self)
            batch.accepted = time.monotonic()
            count = len(batch.calls)
            self.registered += count
            self.stats["queued"] += count
            overflow = self.stats["queued"] > self.backlog
            if overflow:
                self.stats["overflowed"] += count
            self._batches.add(batch)
        if overflow:
            self._warn_overflow(batch)
        for hook in self.on_accept:
            self._hook(hook, batch)
        if helper is not None and helper.send(batch):
            return
        if self.slow and not workers.watching:
            workers.watching = True
            threading.Thread(
                target=self._watch_slow, args=(workers,), name="deferred-slow", daemon=True
            ).start()
        self._dispatch(workers, batch)
        # The executor's threads are background work (cpus.background): they never
        # preempt this serving thread, which gives them the CPU and the GIL here, at
        # most once per switch interval. That bounds the start of a call (about 5 ms)
        # and lets the waiting threads run one after another, not each in a convoy.
        if batch.accepted - workers.yielded >= workers.yield_every:
            workers.yielded = batch.accepted
            os.sched_yield()

    def _helper_here(self) -> Helper:
        """This process's helper, forked on first use (before the lock: a fork under a
        held lock would leave it held in the child)."""
        with self._helper_lock:
            helper = self._helper
            if helper is None or helper.parent != os.getpid() or helper.dead:
                settings = {
                    "threads": self.threads,
                    "concurrency": self.concurrency,
                    "backlog": self.backlog,
                    "slow": self.slow,
                    "timeout": self.timeout,
                }
                helper = self._helper = Helper(settings, self._helper_report, type(self))
            return helper

    def _helper_report(self, batch: Batch, index: int, state: State, when: float) -> None:
        """From the helper's reader thread: a call of ``batch`` started or ended there."""
        if index == len(batch.calls):
            self._batch_over(batch)
            return
        call = batch.calls[index]
        if state is State.RUNNING:
            self._start(batch, call, None, when)
        elif state is State.ABANDONED:  # the helper logged it
            with self._lock:
                if call.state.ended:
                    return
                self.stats[call.state.value] -= 1
                self.stats["abandoned"] += 1
                call.state = State.ABANDONED
                batch.failed += 1
                self._running.pop(call, None)
            for hook in self.on_end:
                self._hook(hook, batch, call)
        else:
            self._end(batch, call, state, seconds=when - call.began)  # it logged failures

    def _dispatch(self, workers: _Workers, batch: Batch, awaiting: Any = None) -> None:
        """Send ``batch`` on to where its next call runs (``awaiting``: a plain function's
        awaitable result, to be awaited on the loop)."""
        if awaiting is None and not _is_async(batch.calls[batch.next].func):
            workers.pool.submit(batch)
            return
        with self._lock:
            workers.inbox.append((batch, awaiting))
            if not workers.idle:
                return  # the loop's next tick takes it
            workers.idle = False
        workers.loop.call_soon_threadsafe(self._tick, workers)

    def _forget_parent(self) -> None:
        """In a forked child (under ``_lock``): the parent's work is not ours to run or count."""
        self._batches.clear()
        self._running.clear()
        self._delays.clear()
        for key in self.stats:
            self.stats[key] = 0
        self.registered = 0

    def _warn_overflow(self, batch: Batch) -> None:
        """Log an overflow; under sustained overload, one line a second with the count."""
        now = time.monotonic()
        with self._lock:
            self._overflow_unlogged += 1
            if now - self._overflow_logged_at < 1.0:
                return
            count, self._overflow_unlogged = self._overflow_unlogged, 0
            self._overflow_logged_at = now
            waiting = self.stats["queued"]
        log.warning(
            "deferred backlog of %d full: %d batch(es) queued beyond it (%d calls waiting), "
            "latest %d call(s) %s",
            self.backlog,
            count,
            waiting,
            len(batch.calls),
            batch.label(),
            extra=tracing.log_fields(batch, batch.calls[0]),
        )

    def skip(self, count: int) -> None:
        """Count calls of a failed request that will not run (never registered here)."""
        with self._lock:
            self.stats["skipped"] += count

    # -- running work -----------------------------------------------------------------

    def _run_plain(self, workers: _Workers, batch: Batch) -> None:
        """On a pool thread: run the batch's plain calls until it ends or needs the loop,
        each in its own context (nothing a call sets reaches the next one)."""
        while batch.next < len(batch.calls):
            call = batch.calls[batch.next]
            if _is_async(call.func):
                self._dispatch(workers, batch)
                return
            result = _context(call).run(self._run_one, workers, batch, call)
            if result is _ABANDONED:
                break
            if result is not None:  # an awaitable, for the loop
                self._dispatch(workers, batch, result)
                return
        self._batch_over(batch)

    def _run_one(self, workers: _Workers, batch: Batch, call: Call) -> Any:
        """In the call's context: run a plain call and record its end. Returns its
        result if that is awaitable (still running), ``_ABANDONED`` if a stop took it."""
        if not self._start(batch, call, None):
            return _ABANDONED
        call.thread = threading.get_ident()
        if self.tracer is not None:
            tracing.begin(self.tracer, batch, call)
        try:
            result = call.func(*call.args, **call.kwargs)
        except BaseException:
            if os.getpid() != workers.pid:
                _leave_forked_child(call)
            self._end(batch, call, State.FAILED, sys.exc_info())
            return None
        if os.getpid() != workers.pid:
            _leave_forked_child(call)
        if inspect.isawaitable(result):
            return result
        self._end(batch, call, State.DONE)
        return None

    def _tick(self, workers: _Workers) -> None:
        """On the loop: start the batches that arrived; tick again while they keep coming.

        Under a stream of submissions the loop picks them up every ``TICK`` instead of
        being woken for each: a wake-up is a pipe write and a GIL hand-off that the
        serving threads pay for. When a tick finds nothing new, the loop sleeps until
        ``_dispatch`` wakes it (or a timer of running work fires).
        """
        with self._lock:
            arrived = workers.inbox
            workers.inbox = []
            workers.idle = not arrived
        for batch, awaiting in arrived:
            workers.loop.create_task(self._run_async(workers, batch, awaiting))
        if arrived:
            workers.loop.call_later(TICK, self._tick, workers)

    async def _run_async(self, workers: _Workers, batch: Batch, awaiting: Any) -> None:
        """On the loop: await the batch's coroutines until it ends or needs a thread;
        each call is a task of its own, in its own context."""
        loop = workers.loop
        async with workers.slots:
            if awaiting is not None:  # a plain call returned an awaitable: its end is ours
                call = batch.calls[batch.next]
                await loop.create_task(self._await(batch, call, awaiting), context=_context(call))
            while batch.next < len(batch.calls):
                call = batch.calls[batch.next]
                if not _is_async(call.func):
                    workers.pool.submit(batch)
                    return
                task = loop.create_task(self._run_coroutine(batch, call), context=_context(call))
                if not await task:
                    break
        self._batch_over(batch)

    async def _run_coroutine(self, batch: Batch, call: Call) -> bool:
        """The call's task: start it, await it, record its end; False if a stop took it."""
        if not self._start(batch, call, asyncio.current_task()):
            return False
        if self.tracer is not None:
            tracing.begin(self.tracer, batch, call)
        try:
            coro = call.func(*call.args, **call.kwargs)
        except BaseException:
            self._end(batch, call, State.FAILED, sys.exc_info())
            return True
        await self._await(batch, call, coro)
        return True

    async def _await(self, batch: Batch, call: Call, awaitable: Any) -> None:
        """Await one call's awaitable under ``timeout``; record how it ended."""
        try:
            if self.timeout:
                await asyncio.wait_for(_as_coroutine(awaitable), self.timeout)
            else:
                await awaitable
        except TimeoutError:
            reason = f"cancelled after {self.timeout:g} s"
            log.error(
                "deferred %s %s %s",
                call.describe(),
                reason,
                batch.label(),
                extra=tracing.log_fields(batch, call),
            )
            self._end(batch, call, State.FAILED, reason=reason)
        except _Escaped as escaped:  # the call's own SystemExit or KeyboardInterrupt
            exc = escaped.__cause__
            assert exc is not None
            self._end(batch, call, State.FAILED, (type(exc), exc, exc.__traceback__))
        except BaseException:  # SystemExit too: log it, go on with the next call
            self._end(batch, call, State.FAILED, sys.exc_info())
        else:
            self._end(batch, call, State.DONE)

    # -- accounting: every call starts once and ends once --------------------------------

    def _start(self, batch: Batch, call: Call, task: Any, now: float | None = None) -> bool:
        """Mark ``call`` running (``now``: when it started, if elsewhere); False if a
        stop has abandoned it meanwhile."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if call.state is not State.QUEUED:
                return False
            call.state = State.RUNNING
            call.began = now
            self.stats["queued"] -= 1
            self.stats["running"] += 1
            self._running[call] = (batch, task)
            if batch.next == 0:
                batch.began = now
                self._delays.append(now - batch.accepted)
        for hook in self.on_start:
            self._hook(hook, batch, call)
        return True

    def _end(
        self,
        batch: Batch,
        call: Call,
        state: State,
        exc_info: Any = None,
        seconds: float | None = None,
        reason: str = "",
    ) -> None:
        """Record the end of a running call (``seconds``: how long it ran, when measured
        elsewhere; ``reason``: why it failed, without an exception); a call abandoned at
        a stop keeps that end. Runs in the call's context when it ran here."""
        now = time.monotonic()
        with self._lock:
            batch.next += 1
            late = call.state is not State.RUNNING
            if not late:
                call.state = state
                self.stats["running"] -= 1
                self.stats[state.value] += 1
                self.last_duration = now - call.began if seconds is None else seconds
                self._running.pop(call, None)
                if state is not State.DONE:
                    batch.failed += 1
        if late:
            log.warning(
                "deferred %s ended after the stop had abandoned it %s",
                call.describe(),
                batch.label(),
                extra=tracing.log_fields(batch, call),
            )
            return
        if exc_info is not None:
            log.error(
                "deferred %s failed %s",
                call.describe(),
                batch.label(),
                exc_info=exc_info,
                extra=tracing.log_fields(batch, call),
            )
        if call.span is not None:
            tracing.end(call, exc_info[1] if exc_info is not None else None, reason)
        for hook in self.on_end:
            self._hook(hook, batch, call)

    def _batch_over(self, batch: Batch) -> None:
        with self._lock:
            if batch not in self._batches:
                return  # a stop abandoned it and reported it
            self._batches.discard(batch)
            if self._draining:
                self._changed.notify_all()
        self._hook(batch.report)

    def _hook(self, hook: Hook, *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("deferred-work hook %r failed", hook)

    # -- the slow log ---------------------------------------------------------------------

    def _watch_slow(self, workers: _Workers) -> None:
        """While calls run, log those past ``slow`` every ``SLOW_CHECK`` s; on a thread of
        its own, not the loop: a coroutine that blocks the loop must be reported too."""
        while True:
            time.sleep(SLOW_CHECK)
            self._check_slow()
            with self._lock:
                workers.watching = bool(self._batches) and not workers.closed
                if not workers.watching:
                    return

    def _check_slow(self) -> None:
        if not self.slow:
            return
        now = time.monotonic()
        frames = None
        with self._lock:
            running = list(self._running.items())
        for call, (batch, task) in running:
            if now - call.began < self.slow or call.reported:
                continue
            if task is None and call.thread is None:
                continue  # running in the helper process, whose own slow log reports it
            call.reported = True
            if task is None:  # a plain function: its pool thread's stack
                frames = frames or _thread_frames()
                frame = frames.get(call.thread or 0)
                stack = traceback.format_stack(frame) if frame else []
            else:  # a coroutine: the frames down its chain of awaits
                chain = [(f, f.f_lineno) for f in task.get_stack(limit=20)]
                stack = traceback.format_list(traceback.StackSummary.extract(chain))
            with self._lock:
                self.stats["slow"] += 1
            _context(call).copy().run(  # the call's own context may be entered by its thread
                log.warning,
                "slow deferred %s running for %.1f s %s:\n%s",
                call.describe(),
                now - call.began,
                batch.label(),
                "".join(stack).rstrip(),
                extra=tracing.log_fields(batch, call),
            )

    # -- stopping ------------------------------------------------------------------------

    def drain(self, timeout: float) -> int:
        """Finish accepted work for up to ``timeout`` seconds; then log each call left
        (never started, or still running) and count it abandoned. Returns how many.

        Work taken during the drain is waited for too. The executor's threads are
        closed; work submitted afterwards starts new ones (a later server in the
        same process). A plain function still running is left to its daemon thread:
        it cannot hold the process at exit.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            abandoned_before = self.stats["abandoned"]
        with self._helper_lock:
            helper, self._helper = self._helper, None
        if helper is not None and helper.parent == os.getpid():
            helper.request_drain(timeout)
        else:
            helper = None
        with self._lock:
            workers = self._workers
            if workers is None or workers.pid != os.getpid():
                return 0  # nothing ever ran in this process
            while self._batches:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._draining += 1
                try:
                    self._changed.wait(left)
                finally:
                    self._draining -= 1
        if helper is not None:  # its last reports end or abandon its calls
            helper.close(max(0.0, deadline - time.monotonic()) + 0.2)
        with self._lock:
            leftover = sorted(self._batches, key=lambda b: b.accepted)
            self._batches.clear()
            self._workers = None
            abandoned: list[tuple[Batch, Call, State]] = []
            for batch in leftover:
                for call in batch.calls[batch.next :]:  # those before it ended
                    if call.state.ended:
                        continue
                    abandoned.append((batch, call, call.state))
                    call.state = State.ABANDONED
                    batch.failed += 1
            for _, call, was in abandoned:  # a few running, the others queued
                self.stats[was.value] -= 1
                if was is State.RUNNING:
                    self._running.pop(call, None)
            self.stats["abandoned"] += len(abandoned)
        workers.close()
        self._abandoned(abandoned)
        for batch in leftover:
            self._hook(batch.report)
        with self._lock:
            counts = dict(self.stats, registered=self.registered)
        if not self.summary:
            return len(abandoned)
        abandoned_here = counts["abandoned"] - abandoned_before  # the helper's included
        log.log(
            logging.WARNING if abandoned_here else logging.INFO,
            "deferred work at stop: %(registered)d call(s) taken, %(done)d done, "
            "%(failed)d failed, %(abandoned)d abandoned",
            counts,
        )
        return abandoned_here

    def _abandoned(self, abandoned: list[tuple[Batch, Call, State]]) -> None:
        """Log the calls a stop abandoned, end their spans and tell the hooks. The first
        ``ABANDON_LINES`` not kept elsewhere are named, each in (a copy of) its context,
        with a span if it never started; the rest are summed up per callable: a stop
        with 200,000 calls queued must leave a log that fits in a rotated file, written
        before the worker's hard exit."""
        named = [item for item in abandoned if not self.keeps(item[1])]
        for batch, call, was in named[:ABANDON_LINES]:
            _context(call).copy().run(self._abandoned_one, batch, call, was is State.RUNNING)
        _sum_up(named[ABANDON_LINES:])
        shown = {id(call) for _, call, _ in named[:ABANDON_LINES]}
        for batch, call, _ in abandoned:
            if call.span is not None and id(call) not in shown:  # still running: its span
                tracing.end(call, reason="abandoned at stop, still running")
            for hook in self.on_end:
                self._hook(hook, batch, call)

    def _abandoned_one(self, batch: Batch, call: Call, running: bool) -> None:
        how = "still running" if running else "never started"
        log.error(
            "deferred %s abandoned at stop, %s %s",
            call.describe(),
            how,
            batch.label(),
            extra=tracing.log_fields(batch, call),
        )
        tracing.abandon(self.tracer, batch, call, f"abandoned at stop, {how}")

    # -- figures --------------------------------------------------------------------------

    def load(self) -> int:
        """Batches taken and not yet over (each runs one call at a time)."""
        return len(self._batches)

    def snapshot(self) -> dict[str, Any]:
        """The counters for the status page; queued + running + done + failed +
        abandoned == every call ever taken. Read without the lock (a copy of a dict is
        one step for the GIL): a stop's last log line must not wait for a drain."""
        return {
            **self.stats,
            "registered": self.registered,
            "last_duration": round(self.last_duration, 6),
        }

    def start_delays(self) -> list[float]:
        """Seconds from the finish to the first call's start, for recent batches."""
        with self._lock:
            return list(self._delays)


_ABANDONED = object()  # _run_one's answer for a call a stop took before it started


def _context(call: Call) -> contextvars.Context:
    """The context ``call`` runs in: its defer()'s, or a fresh one for a call made
    without (a journal's takeover), kept so its task and its log lines share it."""
    if call.context is None:
        call.context = contextvars.Context()
    return call.context


def _sum_up(abandoned: list[tuple[Batch, Call, State]]) -> None:
    """One line per callable for abandoned calls past the first ``ABANDON_LINES``: how
    many (how many running), and the oldest with its request."""
    rest: dict[str, list[Any]] = {}  # callable: [count, running, oldest batch]
    for batch, call, was in abandoned:
        name = call.name
        seen = rest.get(name)
        if seen is None:
            rest[name] = [1, was is State.RUNNING, batch]
        else:
            seen[0] += 1
            seen[1] += was is State.RUNNING
    now = time.monotonic()
    for name, (count, running, oldest) in rest.items():
        log.error(
            "deferred %s: %d more call(s) abandoned at stop (%d still running, %d never "
            "started), the oldest taken %.1f s before %s",
            name,
            count,
            running,
            count - running,
            now - oldest.accepted,
            oldest.label(),
        )


def _is_async(func: Any) -> bool:
    if type(func) is FunctionType and not hasattr(func, "_is_coroutine_marker"):
        return bool(func.__code__.co_flags & inspect.CO_COROUTINE)  # most calls: quick
    try:
        return inspect.iscoroutinefunction(func)
    except Exception:  # a proxy whose attributes raise (an unbound LocalProxy): run it plain
        return False


class _Escaped(Exception):
    """A call's SystemExit or KeyboardInterrupt (its ``__cause__``), carried as an
    ``Exception``: from a task of its own (``asyncio.wait_for`` on Python 3.11) asyncio
    would re-raise it out of the loop besides handing it to the awaiting call."""


async def _as_coroutine(awaitable: Any) -> Any:
    try:
        return await awaitable
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _Escaped from exc


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


__all__ = ["Batch", "Call", "DeferredExecutor", "State"]
