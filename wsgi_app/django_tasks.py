"""A Django Tasks backend that runs each task after the response, in the worker that served it.

Django 6's ``django.tasks`` (or the ``django-tasks`` backport on older Django)::

    TASKS = {"default": {"BACKEND": "wsgi_app.django_tasks.AfterResponseBackend"}}

    @task
    def send_welcome(address): ...

    def signup(request):
        send_welcome.enqueue(request.POST["email"])  # runs once the visitor has the page

Inside a request served through ``DeferredMiddleware``, ``enqueue()`` hands the
task to ``defer()``: it runs after the response, in this worker, in the order
enqueued, with everything deferred work gets (the request in its log lines, the
drain on a graceful stop, the journal or Celery when they are configured).
``enqueue()`` returns a ``TaskResult`` with its id and status READY; this
process updates that same object as the task runs (RUNNING, then SUCCESSFUL
with ``return_value``, or FAILED with ``errors``), and sends the
``task_enqueued``/``task_started``/``task_finished`` signals.

Outside a request (``manage.py shell``, a management command, a test, deferred
work itself) there is no response to wait for: ``enqueue()`` runs the task
at once and returns it finished, exactly like Django's ``ImmediateBackend``
(a failure is recorded in the result, never raised).

Not supported, and refused by Django's own checks: ``run_after`` (no
scheduler), priorities (a request's tasks run in the order enqueued), and
``get_result()``/``refresh()`` (results live in the memory of the worker that
ran them). Async task functions are supported: they are awaited on the
deferred-work event loop.
"""

from __future__ import annotations

import inspect
import threading
import traceback
from typing import Any

from django.db import close_old_connections
from django.utils import timezone
from django.utils.crypto import get_random_string
from django.utils.module_loading import import_string

from .deferred import current_environ, defer

try:  # Django 6 and later
    from django.tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import Task, TaskError
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError:  # the django-tasks backport
    from django_tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.base import Task, TaskError
    from django_tasks.signals import task_enqueued, task_finished, task_started
    from django_tasks.utils import normalize_json

__all__ = ["AfterResponseBackend", "arun_task", "run_task"]

# Results enqueued in this process and not yet run, so the runner updates the very object
# enqueue() returned. A call run elsewhere (a restarted worker's journal, Celery) builds its own,
# and so does one whose entry was dropped: a request's calls can be skipped (the request failed)
# or abandoned (a stop), so the oldest entries go beyond WAITING_LIMIT instead of piling up.
WAITING_LIMIT = 10_000
_waiting: dict[str, tuple[AfterResponseBackend, TaskResult]] = {}
_waiting_lock = threading.Lock()


class AfterResponseBackend(BaseTaskBackend):
    """Tasks run after the response in this worker (inside a request), at once (outside)."""

    supports_async_task = True
    supports_defer = False  # run_after
    supports_get_result = False
    supports_priority = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.worker_id = get_random_string(32)

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        result = _new_result(task, get_random_string(32), args, kwargs, self.alias)
        object.__setattr__(result, "enqueued_at", timezone.now())
        task_enqueued.send(type(self), task_result=result)
        environ = current_environ()
        if environ is None:  # no response to wait for: ImmediateBackend's behaviour
            try:
                self._run(result)
            except KeyboardInterrupt:
                raise
            except BaseException:
                pass  # recorded in result.errors and logged by django.tasks, as Immediate does
            return result
        runner = arun_task if inspect.iscoroutinefunction(task.func) else run_task
        with _waiting_lock:
            _waiting[result.id] = (self, result)
            if len(_waiting) > WAITING_LIMIT:
                del _waiting[next(iter(_waiting))]
        try:  # plain data only, so the journal or Celery can record the call and run it elsewhere
            defer(
                environ, runner, task.module_path, result.args, result.kwargs, result.id, self.alias
            )
        except BaseException:
            with _waiting_lock:
                _waiting.pop(result.id, None)
            raise
        return result

    def _run(self, result: TaskResult) -> None:
        """Run a sync task now, recording its outcome; a failure is re-raised (see _failed)."""
        args = self._started(result)
        try:
            value = normalize_json(result.task.call(*args, **result.kwargs))
        except BaseException as exc:
            self._failed(result, exc)
            raise
        self._succeeded(result, value)

    async def _arun(self, result: TaskResult) -> None:
        args = self._started(result)
        try:
            value = normalize_json(await result.task.acall(*args, **result.kwargs))
        except BaseException as exc:
            self._failed(result, exc)
            raise
        self._succeeded(result, value)

    def _started(self, result: TaskResult) -> list[Any]:
        """Mark ``result`` RUNNING; the arguments to call with (TaskContext first if asked)."""
        now = timezone.now()
        object.__setattr__(result, "status", TaskResultStatus.RUNNING)
        object.__setattr__(result, "started_at", now)
        object.__setattr__(result, "last_attempted_at", now)
        result.worker_ids.append(self.worker_id)
        task_started.send(type(self), task_result=result)
        if result.task.takes_context:
            return [TaskContext(task_result=result), *result.args]
        return list(result.args)

    def _succeeded(self, result: TaskResult, value: Any) -> None:
        object.__setattr__(result, "_return_value", value)
        object.__setattr__(result, "finished_at", timezone.now())
        object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
        task_finished.send(type(self), task_result=result)

    def _failed(self, result: TaskResult, exc: BaseException) -> None:
        """Record the failure in the result; the caller re-raises it, so the deferred-work
        executor logs it with the request and counts it failed."""
        kind = type(exc)
        object.__setattr__(result, "finished_at", timezone.now())
        result.errors.append(
            TaskError(
                exception_class_path=f"{kind.__module__}.{kind.__qualname__}",
                traceback="".join(traceback.format_exception(exc)),
            )
        )
        object.__setattr__(result, "status", TaskResultStatus.FAILED)
        task_finished.send(type(self), task_result=result)


def _result(
    path: str, args: list[Any], kwargs: dict[str, Any], result_id: str, alias: str
) -> tuple[AfterResponseBackend, TaskResult]:
    """The backend and the waiting result, or both found again from the task's import path."""
    with _waiting_lock:
        waiting = _waiting.pop(result_id, None)
    if waiting is not None:
        return waiting
    task = import_string(path)
    if task.backend != alias:
        task = task.using(backend=alias)
    return task_backends[alias], _new_result(task, result_id, args, kwargs, alias)


def _new_result(task: Task, result_id: str, args: Any, kwargs: Any, alias: str) -> TaskResult:
    return TaskResult(
        task=task,
        id=result_id,
        status=TaskResultStatus.READY,
        enqueued_at=None,
        started_at=None,
        last_attempted_at=None,
        finished_at=None,
        args=args,
        kwargs=kwargs,
        backend=alias,
        errors=[],
        worker_ids=[],
    )


def run_task(
    path: str, args: list[Any], kwargs: dict[str, Any], result_id: str, alias: str
) -> None:
    """Run one enqueued task after its response (what AfterResponseBackend defers).

    Database connections are checked before and after, as Django does around a
    request, since this thread serves no request that would close them."""
    backend, result = _result(path, args, kwargs, result_id, alias)
    close_old_connections()
    try:
        backend._run(result)
    finally:
        close_old_connections()


async def arun_task(
    path: str, args: list[Any], kwargs: dict[str, Any], result_id: str, alias: str
) -> None:
    """Await one enqueued async task after its response."""
    backend, result = _result(path, args, kwargs, result_id, alias)
    await backend._arun(result)
