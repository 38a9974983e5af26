"""Django Tasks and views for the in-process tests of AfterResponseBackend.

Tasks are module-level, as the Tasks API requires; each records what it saw in
``ran``. Views keep the ``TaskResult`` they got in ``results`` by name, so a test
can watch the very object ``enqueue()`` returned.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading

from django.http import HttpRequest, HttpResponse
from django.urls import path

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task

ran: list[tuple[str, object]] = []
results: dict[str, object] = {}
release = threading.Event()  # a task that waits for the test, to see it RUNNING
# bound by the view for ?tenant=, as a middleware would: the tasks see the request's value
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="<none>")


@task
def record(name: str) -> str:
    ran.append((name, threading.current_thread().name))
    return f"recorded {name}"


@task
def fail(name: str) -> None:
    ran.append((name, "failing"))
    raise ValueError(f"task {name} broke")


@task
async def arecord(name: str) -> str:
    await asyncio.sleep(0)
    ran.append((name, "awaited"))
    return f"awaited {name}"


@task(takes_context=True)
def with_context(context, name: str) -> str:
    ran.append((name, context.task_result.id))
    return context.task_result.id


@task
def held(name: str) -> str:
    release.wait(10)
    ran.append((name, "released"))
    return name


@task
def enqueue_from_a_task(name: str) -> str:
    """Deferred work is outside any request: a task it enqueues runs at once."""
    inner = record.enqueue(f"{name}-inner")
    ran.append((name, str(inner.status)))
    return str(inner.status)


@task
def record_tenant(name: str) -> None:
    ran.append((name, tenant.get()))


@task
async def arecord_tenant(name: str) -> None:
    await asyncio.sleep(0)
    ran.append((name, tenant.get()))


def deep_inside(name: str) -> None:
    """Code far below a view, with no request at hand."""
    results[name] = record.enqueue(name)


def enqueue(request: HttpRequest, which: str) -> HttpResponse:
    tasks = {
        "record": record,
        "fail": fail,
        "arecord": arecord,
        "with_context": with_context,
        "held": held,
        "enqueue_from_a_task": enqueue_from_a_task,
        "record_tenant": record_tenant,
        "arecord_tenant": arecord_tenant,
    }
    names = request.GET.get("names", "a").split(",")
    token = tenant.set(request.GET["tenant"]) if "tenant" in request.GET else None
    for name in names:
        if which == "deep":
            deep_inside(name)
        else:
            results[name] = tasks[which].enqueue(name)
    if token is not None:
        tenant.reset(token)
    shown = " ".join(f"{name}={results[name].status}" for name in names)
    return HttpResponse(shown + "\n", content_type="text/plain")


async def aenqueue(request: HttpRequest) -> HttpResponse:
    """An async view (Django runs it on an event loop even under WSGI): aenqueue()."""
    name = request.GET["names"]
    results[name] = await record.aenqueue(name)
    return HttpResponse(f"{name}={results[name].status}\n", content_type="text/plain")


urlpatterns = [path("async", aenqueue), path("<str:which>", enqueue)]
