"""Django Tasks run after the response, in one file:
``fcgi-serve examples.django_tasks_app:application``, then GET /report?name=june.

Each request answers at once; the one-second task runs afterwards in the same
worker (``REPORT_FILE``, default var/log/reports.log, gets a line per task).
In a real project, put ``TASKS`` in settings.py, ``@task`` functions in a
tasks.py, and wrap the application in wsgi.py as below. Works with Django 6's
``django.tasks`` and with the ``django-tasks`` backport on older Django.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse
from django.urls import path

from wsgi_app.deferred import DeferredMiddleware

try:
    from django.tasks import task

    BACKPORT = []
except ImportError:  # Django before 6: pip install django-tasks
    from django_tasks import task

    BACKPORT = ["django_tasks"]

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="example-only",
        INSTALLED_APPS=BACKPORT,
        TASKS={"default": {"BACKEND": "wsgi_app.django_tasks.AfterResponseBackend"}},
    )
    django.setup()

REPORT_FILE = Path(os.environ.get("REPORT_FILE", "var/log/reports.log"))


@task
def build_report(name: str, seconds: float = 1.0) -> str:
    """The slow part of a page (a PDF, a mail, a webhook): a second of work, then a line."""
    started = time.time()
    time.sleep(seconds)
    line = f"{name} pid={os.getpid()} started={started:.3f} ended={time.time():.3f}"
    with REPORT_FILE.open("a") as out:
        out.write(line + "\n")
    return line


def report(request: HttpRequest) -> HttpResponse:
    result = build_report.enqueue(request.GET.get("name", "report"))
    return HttpResponse(f"{result.id} {result.status}\n", content_type="text/plain")


urlpatterns = [path("report", report)]

application = DeferredMiddleware(get_wsgi_application())
