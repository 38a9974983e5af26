"""Where deferred calls go when they must outlive the worker: the journal, or Celery.

The middleware asks an backend twice per request that deferred work: ``encode``
at each ``defer()`` (so a call that cannot travel is refused there, naming it),
and ``accept`` once the app is done, before the response is finished. The
journal backend appends the batch to the worker's journal log there and lets the
worker's own executor run it; the Celery backend swaps the batch's calls for one call that
publishes them as a single task, which the executor runs after the response.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from .journal.store import Journal, Row, Sweeper
from .runtime.callpath import Unrecordable, dumps_args, loads_args, path_of, resolve
from .runtime.calls import Batch, Call, State
from .runtime.executor import DeferredExecutor

log = logging.getLogger("wsgi_app.deferred")

# each call that must travel, with what the backend made of it at defer()
Records = list[tuple[Call, Any]]


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "failed (see the worker's log)"
    text = f"{type(error).__name__}: {error}".splitlines()
    return text[0][:500] if text else type(error).__name__


def _origin(batch: Batch) -> str:
    return f"{batch.origin} id={batch.request_id}" if batch.request_id else batch.origin


def _kept(batch: Batch, records: Records) -> Records:
    """The records of calls still in the batch (a failed request drops some)."""
    present = set(batch.calls)
    return [(call, record) for call, record in records if call in present]


class JournalBackend:
    """Calls recorded in an SQLite journal before the response is finished, run by this
    worker's executor, taken over by another worker when this one dies."""

    def __init__(self, path: str, executor: DeferredExecutor, attempts: int, retry: float):
        self.journal = Journal(path, attempts=attempts, retry=retry)
        self.executor = executor
        self.sweeper = Sweeper(self.journal, self._run, self._room)
        self._ids: dict[Call, int] = {}  # journaled calls not yet ended: their row ids
        self._lock = threading.Lock()
        executor.on_end.append(self._ended)

    def start(self) -> None:
        self.sweeper.start()

    def stop(self, seconds_left: float = 0.0) -> int:
        """A drain hook: stop taking calls over (what is left stays in the journal)."""
        return self.sweeper.stop(seconds_left)

    def flush(self, seconds_left: float = 0.0) -> int:
        """A drain hook after the executor's: forget every call that ended."""
        return self.journal.flush(seconds_left)

    def encode(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[str, bytes]:
        path = path_of(func)
        return path, dumps_args(path, args, kwargs)

    def accept(self, batch: Batch, records: Records) -> Batch:
        """On the serving thread, before the finish: one write to the log for the batch."""
        records = _kept(batch, records)
        if records:
            ids = self.journal.record(_origin(batch), [record for _, record in records])
            self._track([call for call, _ in records], ids)
        return batch

    def stats(self) -> dict[str, int]:
        return self.journal.counts()

    def _track(self, calls: list[Call], ids: list[int]) -> None:
        with self._lock:
            self._ids.update(zip(calls, ids, strict=True))

    def _ended(self, batch: Batch, call: Call) -> None:
        """The executor's on_end hook: forget a call done, note a failure; a call
        abandoned at a stop stays in the journal for the next worker."""
        with self._lock:
            call_id = self._ids.pop(call, None)
        if call_id is None:  # a volatile() call: never recorded
            return
        if call.state is State.ABANDONED:  # a stop's deadline: the next worker runs it
            log.warning(
                "deferred %s kept in %s for the next worker %s",
                call.describe(),
                self.journal.path,
                batch.label(),
            )
            return
        if call.state is State.DONE:
            self.journal.done(call_id)
            return
        # the hook runs inside the executor's except block: the exception is still current
        delay = self.journal.failed(call_id, _one_line(sys.exc_info()[1]))
        if delay is None:
            log.error(
                "deferred %s dead after %d attempts %s: kept in %s, see "
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

    def _room(self) -> bool:
        return self.executor.snapshot().get("queued", 0) < self.executor.backlog // 2

    def _run(self, rows: list[Row]) -> None:
        """Run a claimed request's calls (a dead worker's, or retries) in their order."""
        batch = Batch(origin=f"{rows[0].origin}, taken over")
        ids = []
        for row in rows:
            try:
                args, kwargs = loads_args(row.payload)
                call = Call(resolve(row.path), args, kwargs)
            except Exception as exc:  # the code changed since: a failure like any other
                log.exception("deferred %s cannot be loaded (request %s)", row.path, row.origin)
                self.journal.failed(row.id, _one_line(exc))
                continue
            ids.append(row.id)
            batch.calls.append(call)
        if batch.calls:
            self._track(batch.calls, ids)
            self.executor.submit(batch)


class CeleryBackend:
    """Calls handed to Celery: each request's calls as one task, run in order by
    ``celery -A wsgi_app.celery worker``; the publishing happens after the response."""

    def __init__(self, broker: str, executor: DeferredExecutor) -> None:
        from . import celery as celery_app

        self.broker = broker
        self.executor = executor
        self._publish = celery_app.publish
        self._check = celery_app.check_arguments

    def start(self) -> None:
        pass

    def stop(self, seconds_left: float = 0.0) -> int:
        return 0

    def flush(self, seconds_left: float = 0.0) -> int:
        return 0

    def encode(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> list[Any]:
        path = path_of(func)
        self._check(path, args, kwargs)
        return [path, list(args), kwargs]

    def accept(self, batch: Batch, records: Records) -> Batch:
        """Swap the recorded calls for one that publishes them (where the first was)."""
        records = _kept(batch, records)
        if not records:
            return batch
        durable = {call for call, _ in records}
        first = min(batch.calls.index(call) for call in durable)
        message = (self.broker, _origin(batch), [record for _, record in records])
        send = Call(self._publish, message, {}, always=True)
        batch.calls = [call for call in batch.calls if call not in durable]
        batch.calls.insert(first, send)
        return batch

    def stats(self) -> dict[str, int]:
        return {}


def backend_for(
    settings: dict[str, Any], executor: DeferredExecutor
) -> JournalBackend | CeleryBackend | None:
    """The backend the settings ask for (journal or Celery, not both), or None: memory."""
    journal, broker = settings.get("journal"), settings.get("celery")
    if journal and broker:
        raise ValueError(
            "journal (DEFERRED_JOURNAL) and celery (DEFERRED_CELERY) are both set: "
            "deferred work runs in one place, choose one"
        )
    if journal:
        return JournalBackend(os.fspath(journal), executor, settings["attempts"], settings["retry"])
    if broker:
        return CeleryBackend(broker, executor)
    return None


__all__ = ["CeleryBackend", "JournalBackend", "Unrecordable", "backend_for"]
