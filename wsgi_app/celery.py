"""The Celery app that runs deferred calls when ``DEFERRED_CELERY`` hands them over.

Start its workers (any number, on any machine that has the app's code)::

    DEFERRED_CELERY=redis://localhost:6379/0 celery -A wsgi_app.celery worker

Each request's deferred calls arrive as one task, ``wsgi_app.deferred_batch``,
carrying ``(import path, args, kwargs)`` for each call; they run in the order the
request registered them, coroutine functions included. A failing call is logged
with its traceback and the request it came from, and the rest of the batch goes
on, as in the worker. Tasks are acknowledged after they ran (``acks_late``), so a
Celery worker killed mid-batch leaves the batch to another: at least once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
from typing import Any

from celery import Celery
from kombu.utils.json import dumps

from .runtime.callpath import Unrecordable, resolve

log = logging.getLogger("wsgi_app.deferred")

TASK = "wsgi_app.deferred_batch"

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
    """Run one request's calls in order; returns how many failed (each is logged)."""
    failed = 0
    for path, args, kwargs in calls:
        try:
            result = resolve(path)(*args, **kwargs)
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))
        except Exception:
            failed += 1
            log.exception("deferred %s failed (request %s)", path, origin)
    return failed


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


_producers: dict[str, Celery] = {}
_lock = threading.Lock()


def publish(broker: str, origin: str, calls: list[list[Any]]) -> None:
    """Send one request's calls as one task (the serving worker runs this after the
    response, as a deferred call of its own: a broker outage is logged with the request)."""
    with _lock:
        producer = _producers.get(broker)
        if producer is None:
            producer = _producers[broker] = Celery("wsgi_app-producer", broker=broker)
            producer.conf.update(task_serializer="json", broker_connection_retry=False)
    producer.send_task(TASK, args=(origin, calls))


def check_arguments(path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse arguments Celery's JSON cannot carry, naming the call."""
    try:
        dumps([list(args), kwargs])
    except (TypeError, ValueError) as exc:
        raise Unrecordable(
            f"arguments of deferred {path} cannot be sent to Celery as JSON ({exc}); pass "
            "plain data (ids, strings, numbers), or wrap the function in volatile() if "
            "losing it is acceptable"
        ) from None
