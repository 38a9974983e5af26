"""Where deferred calls go when they must outlive the worker: the journal, or Celery.

The middleware asks an engine twice per request that deferred work: ``encode``
at each ``defer()`` (so a call that cannot travel is refused there, naming it),
and ``accept`` once the app is done, before the response is finished. The
journal engine writes the batch to SQLite there and lets the worker's own
executor run it; the Celery engine swaps the batch's calls for one call that
publishes them as a single task, which the executor runs after the response.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from .callpath import Unrecordable, dumps_args, loads_args, path_of, resolve
from .executor import Batch, Call, DeferredExecutor
from .journal import Journal, Row, Sweeper

log = logging.getLogger("wsgi_app.deferred")

# (index of the call in its batch, what the engine keeps of it)
Records = list[tuple[int, Any]]


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()
    return text[0][:500] if text else type(error).__name__


class JournalEngine:
    """Calls recorded in an SQLite journal before the response is finished, run by this
    worker's executor, taken over by another worker when this one dies."""

    def __init__(self, path: str, executor: DeferredExecutor, attempts: int, retry: float):
        self.journal = Journal(path, attempts=attempts, retry=retry)
        self.executor = executor
        self.sweeper = Sweeper(self.journal, self._run, self._room)

    def start(self) -> None:
        self.sweeper.start()

    def encode(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[str, bytes]:
        path = path_of(func)
        return path, dumps_args(path, args, kwargs)

    def accept(self, batch: Batch, records: Records) -> Batch:
        """On the serving thread, before the finish: one transaction for the batch."""
        ids = self.journal.record(batch.origin, [record for _, record in records])
        self._track(batch, dict(zip((index for index, _ in records), ids, strict=True)))
        return batch

    def stats(self) -> dict[str, int]:
        return self.journal.counts()

    def _track(self, batch: Batch, ids: dict[int, int]) -> None:
        journal = self.journal

        def ended(index: int, error: BaseException | None) -> None:
            call_id = ids.get(index)
            if call_id is None:  # a volatile() call: never recorded
                return
            if error is None:
                journal.done(call_id)
                return
            delay = journal.failed(call_id, _one_line(error))
            if delay is None:
                log.error(
                    "deferred %s dead after %d attempts (request %s): kept in %s, see "
                    "python -m wsgi_app.journal list",
                    batch.calls[index].describe(),
                    journal.attempts,
                    batch.origin,
                    journal.path,
                )
            else:
                log.warning(
                    "deferred %s will be retried in %g s (request %s)",
                    batch.calls[index].describe(),
                    delay,
                    batch.origin,
                )

        batch.on_call_end = ended

    def _room(self) -> bool:
        return self.executor.snapshot().get("queued", 0) < self.executor.backlog // 2

    def _run(self, rows: list[Row]) -> None:
        """Run a claimed request's calls (a dead worker's, or retries) in their order."""
        batch = Batch(origin=f"{rows[0].origin} (taken over)")
        ids = {}
        for row in rows:
            try:
                args, kwargs = loads_args(row.payload)
                call = Call(resolve(row.path), args, kwargs)
            except Exception as exc:  # the code changed since: a failure like any other
                log.exception("deferred %s cannot be loaded (request %s)", row.path, row.origin)
                self.journal.failed(row.id, _one_line(exc))
                continue
            ids[len(batch.calls)] = row.id
            batch.calls.append(call)
        if batch.calls:
            self._track(batch, ids)
            self.executor.submit(batch)


class CeleryEngine:
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

    def encode(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> list[Any]:
        path = path_of(func)
        self._check(path, args, kwargs)
        return [path, list(args), kwargs]

    def accept(self, batch: Batch, records: Records) -> Batch:
        """Swap the recorded calls for one that publishes them (where the first was)."""
        durable = {index for index, _ in records}
        send = Call(self._publish, (self.broker, batch.origin, [r for _, r in records]), {})
        calls = [c for i, c in enumerate(batch.calls) if i not in durable]
        calls.insert(min(durable), send)
        batch.calls = calls
        return batch

    def stats(self) -> dict[str, int]:
        return {}


def engine_for(
    settings: dict[str, Any], executor: DeferredExecutor
) -> JournalEngine | CeleryEngine | None:
    """The engine the settings ask for (journal or Celery, not both), or None: memory."""
    journal, broker = settings.get("journal"), settings.get("celery")
    if journal and broker:
        raise ValueError(
            "journal (DEFERRED_JOURNAL) and celery (DEFERRED_CELERY) are both set: "
            "deferred work runs in one place, choose one"
        )
    if journal:
        return JournalEngine(os.fspath(journal), executor, settings["attempts"], settings["retry"])
    if broker:
        return CeleryEngine(broker, executor)
    return None


__all__ = ["CeleryEngine", "JournalEngine", "Unrecordable", "engine_for"]
