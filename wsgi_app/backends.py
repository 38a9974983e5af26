"""Where deferred calls go when they must outlive the worker: the journal, Celery, or both.

The middleware asks a backend three things per request that defers work:
``encode`` at each ``defer()`` (so a call that cannot travel is refused there,
naming it; its metadata, which travels with it, carries its place in the request's
trace), ``record`` before any part of the response that follows the calls can
reach the visitor (one write for the calls deferred until then; at once for a call
deferred after the finish), and ``accept`` once the response is over, which says
what of the batch the worker's executor still runs. ``forget`` drops recorded
calls of a request that failed.

- ``JournalBackend``: the calls are appended to the worker's journal log, and run by
  the worker's own executor; another worker takes them over if this one dies.
- ``CeleryBackend``: the calls are handed to Celery by a background publisher. With
  a journal too (the outbox), they are recorded first, in the same one write, and
  marked sent once published: a worker killed before publishing loses nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .journal.store import Journal, Row
from .journal.sweeper import Sweeper
from .journal.takeover import CLAIM_REQUESTS
from .runtime import tracing
from .runtime.callpath import Unrecordable, dumps_args, loads_args, path_of, resolve
from .runtime.calls import Batch, Call, State
from .runtime.executor import DeferredExecutor

log = logging.getLogger("wsgi_app.deferred")

# each call that must travel, with what the backend made of it at defer()
Records = Sequence[tuple[Call, Any]]


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "failed (see the worker's log)"
    text = f"{type(error).__name__}: {error}".splitlines()
    return text[0][:500] if text else type(error).__name__


class JournalBackend:
    """Calls recorded in an SQLite journal before the visitor has the response, run by
    this worker's executor, taken over by another worker of the app when this one dies."""

    def __init__(
        self,
        path: str,
        executor: DeferredExecutor,
        attempts: int,
        retry: float,
        app: str,
        take_over: Callable[[list[Row]], None] | None = None,
        room: Callable[[], int] | None = None,
    ) -> None:
        slots = executor.threads + executor.concurrency + 64  # every call running at once
        self.journal = Journal(path, attempts=attempts, retry=retry, app=app, slots=slots)
        self.journal.join()  # a journal this worker cannot write stops it here, at start
        self.executor = executor
        # what becomes of claimed calls (run here; the outbox publishes them)
        self.sweeper = Sweeper(self.journal, take_over or self._run, room or self._room)
        self._ids: dict[Call, int] = {}  # journaled calls not yet ended: their keys or row ids
        self._slots: dict[Call, int] = {}  # running ones: their slot on the journal's board
        self._kept = 0  # calls a stop left in the journal: one line at the flush
        executor.on_start.append(self._started)
        executor.on_end.append(self._ended)
        executor.keeps = self._ids.__contains__  # what a stop abandons, flush() counts

    def start(self) -> None:
        self.sweeper.start()

    def serve(self) -> None:
        """The app is served in this process: take calls over."""
        self.sweeper.serve()

    def name_app(self, name: str) -> None:
        """The app's name as its server gives it (before any call is recorded or claimed)."""
        self.journal.app = name

    def stop(self, seconds_left: float = 0.0) -> int:
        """A drain hook: stop taking calls over (what is left stays in the journal)."""
        return self.sweeper.stop(seconds_left)

    def flush(self, seconds_left: float = 0.0) -> int:
        """A drain hook after the executor's: say which calls ended; what a stop cut
        stays pending, with none of its attempts used."""
        kept, self._kept = self._kept, 0
        if kept:
            log.warning(
                "deferred journal %s: %d call(s) left pending for the next worker of the app "
                "(none counted as an attempt)",
                self.journal.path,
                kept,
            )
        return self.journal.flush(seconds_left)

    def encode(self, call: Call) -> tuple[str, bytes, dict[str, str] | None]:
        path = path_of(call.func)
        return path, dumps_args(path, call.args, call.kwargs), tracing.carried(call.context)

    def record(self, batch: Batch, records: Records) -> None:
        """On the serving thread: one write to the log for these calls."""
        keys = self.journal.record(batch.travelling(), [record for _, record in records])
        self._ids.update(zip([call for call, _ in records], keys, strict=True))

    def accept(self, batch: Batch, records: Records) -> Batch:
        """The response is over: the executor runs the batch as it is."""
        return batch

    def handed(self, calls: Sequence[Call]) -> list[int]:
        """Recorded calls that leave this worker (to Celery): their keys, for ``sent``."""
        return [self._ids.pop(call) for call in calls]

    def sent(self, keys: Sequence[int]) -> None:
        """Calls handed over are someone else's now: ended here."""
        for key in keys:
            self.journal.done(key)

    def forget(self, calls: Sequence[Call]) -> None:
        """Recorded calls of a request that failed: they will not run."""
        for call in calls:
            key = self._ids.pop(call, None)
            if key is not None:
                self.journal.done(key)

    def stats(self) -> dict[str, int]:
        return self.journal.counts()

    def _started(self, batch: Batch, call: Call) -> None:
        """The executor's on_start hook: the board says it runs (a store in memory)."""
        key = self._ids.get(call)
        if key is not None:
            self._slots[call] = self.journal.running(key)

    def _ended(self, batch: Batch, call: Call) -> None:
        """The executor's on_end hook: forget a call done, count a failure; a call
        a stop abandoned stays pending in the journal, its attempts untouched."""
        slot = self._slots.pop(call, None)
        if slot is not None:
            self.journal.stopped(slot)
        key = self._ids.pop(call, None)
        if key is None:  # a volatile() call: never recorded
            return
        if call.state is State.ABANDONED:  # a stop's deadline: the next worker runs it
            self._kept += 1
            return
        if call.state is State.DONE:
            self.journal.done(key)
            return
        # the hook runs inside the executor's except block: the exception is still current
        delay = self.journal.failed(key, _one_line(sys.exc_info()[1]))
        if delay is None:
            log.error(
                "deferred %s dead after %d failed attempt(s) %s: kept in %s, see "
                "python -m wsgi_app.journal list",
                call.describe(),
                self.journal.attempts,
                batch.label(),
                self.journal.path,
            )
        else:
            log.warning(
                "deferred %s will be retried in %g s %s", call.describe(), delay, batch.label()
            )

    def _room(self) -> int:
        """Requests to take over now: as many as the executor can start at once, as it
        would start new ones (each request's calls run in their order, one at a time)."""
        return self.executor.threads - self.executor.load()

    def _run(self, rows: list[Row]) -> None:
        """Run a claimed request's calls (a dead worker's, or retries) in their order,
        each in its request's trace when it carries one."""
        batch = Batch.travelled(rows[0].origin, ", taken over")
        ids = []
        for row in rows:
            try:
                args, kwargs = loads_args(row.payload)
                call = Call(resolve(row.path), args, kwargs, context=tracing.context_of(row.meta))
            except Exception as exc:  # the code changed since: a failure like any other
                log.exception("deferred %s cannot be loaded (request %s)", row.path, row.origin)
                self.journal.failed(row.id, _one_line(exc))
                continue
            ids.append(row.id)
            batch.calls.append(call)
        if batch.calls:
            self._ids.update(zip(batch.calls, ids, strict=True))
            self.executor.submit(batch)


class CeleryBackend:
    """Calls handed to Celery by a background publisher: several requests per message,
    each request's calls run in order by ``celery -A wsgi_app.celery worker``. With a
    journal (the outbox) they are recorded first and marked sent once published;
    without, a request's calls not yet published die with the worker."""

    def __init__(
        self, broker: str, executor: DeferredExecutor, journal: dict[str, Any] | None
    ) -> None:
        from . import celery as celery_app  # only then: Celery stays unimported

        self.broker = broker
        self.executor = executor
        self.publisher = celery_app.Publisher(broker, self._sent)
        self._check = celery_app.check_arguments
        self.outbox = None
        if journal is not None:  # claimed calls (a dead worker's) are published, not run
            self.outbox = JournalBackend(
                **journal, executor=executor, take_over=self._resend, room=self._room
            )

    def start(self) -> None:
        if self.outbox is not None:
            self.outbox.start()

    def serve(self) -> None:
        if self.outbox is not None:
            self.outbox.serve()

    def name_app(self, name: str) -> None:
        if self.outbox is not None:
            self.outbox.name_app(name)

    def stop(self, seconds_left: float = 0.0) -> int:
        return 0 if self.outbox is None else self.outbox.stop(seconds_left)

    def flush(self, seconds_left: float = 0.0) -> int:
        """A drain hook: publish what waits, up to the deadline; what is left stays in the
        journal (the outbox), or is lost; either way it is counted."""
        left = self.publisher.drain(seconds_left)
        if self.outbox is None:
            if left:
                log.error("deferred: %d call(s) not handed to Celery by the stop, lost", left)
            return left
        if left:
            log.warning(
                "deferred journal %s: %d call(s) not yet handed to Celery left pending for "
                "the next worker of the app",
                self.outbox.journal.path,
                left,
            )
        self.outbox.flush()
        return left

    def encode(self, call: Call) -> Any:
        path = path_of(call.func)
        self._check(path, call.args, call.kwargs)
        if self.outbox is not None:
            return self.outbox.encode(call)
        return path, None, tracing.carried(call.context)

    def record(self, batch: Batch, records: Records) -> None:
        if self.outbox is not None:
            self.outbox.record(batch, records)

    def accept(self, batch: Batch, records: Records) -> Batch:
        """Hand the calls that travel to the publisher; the batch keeps the others
        (``volatile()``), which this worker runs. Serving threads never publish."""
        if not records:
            return batch
        durable = [call for call, _ in records]
        calls = [_message(path, call.args, call.kwargs, meta) for call, (path, _, meta) in records]
        tokens = durable if self.outbox is None else self.outbox.handed(durable)
        self.publisher.put(batch.travelling(), calls, tokens)
        travelled = set(durable)
        batch.calls = [call for call in batch.calls if call not in travelled]
        return batch

    def forget(self, calls: Sequence[Call]) -> None:
        if self.outbox is not None:
            self.outbox.forget(calls)

    def stats(self) -> dict[str, int]:
        return {} if self.outbox is None else self.outbox.stats()

    def _sent(self, tokens: Sequence[Any]) -> None:
        """The publisher's: these calls are Celery's now."""
        if self.outbox is not None:
            self.outbox.sent(tokens)

    def _room(self) -> int:
        """Requests to take over now: while the publisher has few waiting."""
        return max(0, CLAIM_REQUESTS - self.publisher.waiting())

    def _resend(self, rows: list[Row]) -> None:
        """A claimed request of the outbox (a dead worker's, never published): publish it."""
        calls = []
        for row in rows:
            args, kwargs = loads_args(row.payload)
            calls.append(_message(row.path, args, kwargs, row.meta))
        origin = Batch.travelled(rows[0].origin, ", taken over").travelling()
        self.publisher.put(origin, calls, [row.id for row in rows])


def _message(path: str, args: tuple, kwargs: dict, meta: dict[str, Any] | None) -> list[Any]:
    """A call as the Celery task takes it: its metadata last, only when it has some."""
    return [path, list(args), kwargs, meta] if meta else [path, list(args), kwargs]


def backend_for(
    settings: dict[str, Any], executor: DeferredExecutor
) -> JournalBackend | CeleryBackend | None:
    """The backend the settings ask for, or None (memory): the journal, Celery, or
    both (Celery with the journal as its outbox)."""
    journal = None
    if settings.get("journal"):
        journal = {
            "path": os.fspath(settings["journal"]),
            "attempts": settings["attempts"],
            "retry": settings["retry"],
            "app": settings["app"],
        }
    if settings.get("celery"):
        return CeleryBackend(settings["celery"], executor, journal)
    if journal is not None:
        return JournalBackend(executor=executor, **journal)
    return None


__all__ = ["CeleryBackend", "JournalBackend", "Unrecordable", "backend_for"]
