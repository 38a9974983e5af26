"""The Celery app that runs deferred calls when ``DEFERRED_CELERY`` hands them over.

Start its workers (any number, on any machine that has the app's code)::

    DEFERRED_CELERY=redis://localhost:6379/0 celery -A wsgi_app.celery worker

The web worker's publisher (``Publisher``, a background thread: serving threads
never publish) sends the calls of the requests that ended in the last
``SEND_EVERY`` seconds (50 ms) as one task, ``wsgi_app.deferred_batches``, carrying
``(origin, [(import path, args, kwargs[, metadata]), ...])`` for each request: a
publish costs the web worker about 0.4 ms of Python (kombu), so one per request
would take a large part of its capacity. Each request's calls run in the order it
registered them, coroutine functions included. A failing call is logged with its
traceback and the request it came from, and the rest go on, as in the worker.
Tasks are acknowledged after they ran (``acks_late``), so a Celery worker killed
mid-task leaves it to another: at least once.

With OpenTelemetry, a call carries the W3C ``traceparent`` of the request's span in
its metadata, and runs here in a span ``deferred <callable>`` under it, as in the web
worker (``wsgi_app.runtime.tracing``): one trace from the request to the Celery
worker. Each call runs in a copy of the task's context (what the Celery worker's own
signal handlers bound is there; what a call sets does not reach the next); the
request's other context variables do not travel.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from kombu.utils.json import dumps

from .runtime import tracing
from .runtime.callpath import Unrecordable, resolve
from .runtime.calls import Batch, Call, State
from .runtime.cpus import background

log = logging.getLogger("wsgi_app.deferred")

TASK = "wsgi_app.deferred_batch"  # one request's calls (what earlier versions sent)
BATCHES_TASK = "wsgi_app.deferred_batches"  # several requests' calls
SEND_EVERY = 0.05  # seconds a request's calls wait to travel with the next requests'
MESSAGE_CALLS = 1000  # calls per task at most
RETRY_MAX = 30.0  # seconds between tries at most while the broker is unreachable

app = Celery("wsgi_app", broker=os.environ.get("DEFERRED_CELERY") or None)
app.conf.update(
    task_serializer="json",  # calls travel as plain data: no pickle from the broker
    accept_content=["json"],
    task_acks_late=True,  # acknowledged once run: a killed Celery worker's batch runs again
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(name=TASK)
def deferred_batch(origin: str, calls: list[list[Any]]) -> int:
    """Run one request's calls in order; returns how many failed (each is logged). A
    call is ``[path, args, kwargs]``, and a fourth item, its metadata (a dict), when
    it has some."""
    batch, tracer, task = Batch.travelled(origin), tracing.tracer(), contextvars.copy_context()
    failed = 0
    for path, args, kwargs, *meta in calls:
        try:
            call = Call(resolve(path), args, kwargs)
        except Exception:
            failed += 1
            log.exception("deferred %s failed (request %s)", path, origin)
            continue
        call.context = tracing.context_of(meta[0] if meta else None, task) or task.copy()
        failed += call.context.run(_run, tracer, batch, call, path)
    return failed


def _run(tracer: Any, batch: Batch, call: Call, path: str) -> bool:
    """In the call's context: run it in its span (under the request's when it carries
    its traceparent); True if it failed."""
    if tracer is not None:
        tracing.begin(tracer, batch, call)
    call.state = State.RUNNING
    try:
        result = call.func(*call.args, **call.kwargs)
        if inspect.isawaitable(result):
            asyncio.run(_awaited(result))
    except Exception as exc:
        call.state = State.FAILED
        log.exception(
            "deferred %s failed (request %s)",
            path,
            batch.travelling(),
            extra=tracing.log_fields(batch, call),
        )
        tracing.end(call, exc)
        return True
    call.state = State.DONE
    tracing.end(call)
    return False


@app.task(name=BATCHES_TASK)
def deferred_batches(batches: list[list[Any]]) -> int:
    """Run several requests' calls, each request's in order; returns how many failed."""
    return sum(deferred_batch(origin, calls) for origin, calls in batches)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


_producers: dict[str, Celery] = {}
_lock = threading.Lock()


def _producer(broker: str) -> Celery:
    with _lock:
        producer = _producers.get(broker)
        if producer is None:
            producer = _producers[broker] = Celery("wsgi_app-producer", broker=broker)
            producer.conf.update(task_serializer="json", broker_connection_retry=False)
    return producer


def publish(broker: str, batches: list[list[Any]]) -> None:
    """Send several requests' calls, ``[origin, calls]`` each, as one task. A short
    ``argsrepr``: Celery's own is a saferepr of every argument, half the publish's CPU."""
    calls = sum(len(calls) for _, calls in batches)
    shown = f"{len(batches)} request(s), {calls} call(s), first {batches[0][0]!r}"[:200]
    _producer(broker).send_task(BATCHES_TASK, args=(batches,), argsrepr=shown, kwargsrepr="{}")


class Publisher:
    """Hands requests' calls to Celery from a background thread, several requests per
    task; ``sent(tokens)`` is told once they are the broker's. While the broker cannot
    be reached it tries again (1 s, doubling up to ``RETRY_MAX``), keeping their order."""

    def __init__(self, broker: str, sent: Callable[[Sequence[Any]], None]) -> None:
        self.broker = broker
        self.sent = sent
        self._waiting: list[tuple[str, list[list[Any]], Sequence[Any]]] = []
        self._calls = 0  # in _waiting
        self._changed = threading.Condition()
        self._pid = 0
        self._hurry = False  # a drain: publish at once
        self._failing_since = 0.0

    def put(self, origin: str, calls: list[list[Any]], tokens: Sequence[Any]) -> None:
        """Queue one request's calls (``tokens``: what ``sent`` gets back for them)."""
        with self._changed:
            if self._pid != os.getpid():  # first use in this process (or a forked child)
                self._pid = os.getpid()
                self._waiting, self._calls = [], 0
                threading.Thread(target=self._loop, name="deferred-celery", daemon=True).start()
            self._waiting.append((origin, calls, tokens))
            self._calls += len(calls)
            if len(self._waiting) == 1:
                self._changed.notify_all()

    def waiting(self) -> int:
        """Requests not yet published."""
        return len(self._waiting)

    def drain(self, seconds_left: float) -> int:
        """Publish what waits, for up to ``seconds_left``; returns the calls left."""
        deadline = time.monotonic() + seconds_left
        with self._changed:
            if self._pid != os.getpid():
                return 0
            self._hurry = True
            self._changed.notify_all()
            while self._waiting and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return self._calls

    def _loop(self) -> None:
        background()
        delay = 1.0
        while True:
            with self._changed:
                while not self._waiting:
                    self._changed.wait()
                hurry = self._hurry
            if not hurry:
                time.sleep(SEND_EVERY)  # the requests ending meanwhile travel with these
            with self._changed:
                taken, count = [], 0
                while self._waiting and (
                    not taken or count + len(self._waiting[0][1]) <= MESSAGE_CALLS
                ):
                    item = self._waiting.pop(0)
                    taken.append(item)
                    count += len(item[1])
            try:
                publish(self.broker, [[origin, calls] for origin, calls, _ in taken])
            except Exception:
                with self._changed:
                    self._waiting[:0] = taken
                    self._changed.notify_all()
                self._failed(count)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = 1.0
            self._failing_since = 0.0
            with self._changed:
                self._calls -= count
                self._changed.notify_all()
            try:
                self.sent([token for *_, tokens in taken for token in tokens])
            except Exception:
                log.exception("deferred: marking %d call(s) sent to Celery failed", count)

    def _failed(self, count: int) -> None:
        """Log a failed publish: with its traceback the first time, then once a minute."""
        now = time.monotonic()
        if not self._failing_since:
            self._failing_since = now
            log.exception(
                "deferred: handing %d call(s) to Celery at %s failed; trying again",
                count,
                self.broker,
            )
        elif now - self._failing_since >= 60:
            self._failing_since = now
            log.error(
                "deferred: Celery at %s still unreachable; %d call(s) waiting",
                self.broker,
                self._calls,
            )


def check_arguments(path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse arguments Celery's JSON cannot carry, naming the call (the standard
    library's encoder first: plain data, most calls, in a third of kombu's time)."""
    try:
        json.dumps([args, kwargs])
        return
    except (TypeError, ValueError):
        pass
    try:
        dumps([list(args), kwargs])  # kombu's: datetimes, UUIDs, decimals too
    except (TypeError, ValueError) as exc:
        raise Unrecordable(
            f"arguments of deferred {path} cannot be sent to Celery as JSON ({exc}); pass "
            "plain data (ids, strings, numbers), or wrap the function in volatile() if "
            "losing it is acceptable"
        ) from None
