"""Django with deferred work, in one file:

    fcgi-serve --reload-check-path /health examples.django_app:application
    fcgi-finish start examples.django_app:application --reload-check-path /health

In a real project, wrap the application in ``mysite/wsgi.py`` the same way and
call ``add_task(...)`` from any view, or from code it calls (no request needed);
``defer(request.environ, ...)`` is the same with the environ given. For Django's
own ``@task``/``.enqueue()``, see examples/django_tasks_app.py.

``--reload-check-path /health`` (FCGI_RELOAD_CHECK_PATH): Django imports a project's
views at its first request, so a reload's import check alone lets a broken
``views.py`` through; with it the check also GETs /health in the new code, which
resolves the URLconf (importing every view), and the reload is refused on an
exception or a 5xx. Give it a page with no side effects (a URL such as
``http://example.com/health`` sends that Host, for ALLOWED_HOSTS).
"""

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse
from django.urls import path

from wsgi_app.deferred import DeferredMiddleware, add_task

if not settings.configured:
    settings.configure(DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="x")
    django.setup()

sent: list[str] = []


def send_welcome(address: str) -> None:
    sent.append(address)


def signup(request):
    add_task(send_welcome, request.GET["email"])
    return HttpResponse(f"welcome, {request.GET['email']}\n")


def health(request):
    return HttpResponse("ok\n")


urlpatterns = [path("signup", signup), path("health", health)]

application = DeferredMiddleware(get_wsgi_application())
