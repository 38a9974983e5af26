"""Django with deferred work, in one file: ``fcgi-serve examples.django_app:application``.

In a real project, wrap the application in ``mysite/wsgi.py`` the same way and
call ``add_task(...)`` from any view, or from code it calls (no request needed);
``defer(request.environ, ...)`` is the same with the environ given. For Django's
own ``@task``/``.enqueue()``, see examples/django_tasks_app.py.
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


urlpatterns = [path("signup", signup)]

application = DeferredMiddleware(get_wsgi_application())
