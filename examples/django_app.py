"""Django with deferred work, in one file: ``fcgi-serve examples.django_app:application``.

In a real project, wrap the application in ``mysite/wsgi.py`` the same way and
call ``defer(request.environ, ...)`` from any view.
"""

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse
from django.urls import path

from wsgi_app.deferred import DeferredMiddleware, defer

if not settings.configured:
    settings.configure(DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="x")
    django.setup()

sent: list[str] = []


def send_welcome(address: str) -> None:
    sent.append(address)


def signup(request):
    defer(request.environ, send_welcome, request.GET["email"])
    return HttpResponse(f"welcome, {request.GET['email']}\n")


urlpatterns = [path("signup", signup)]

application = DeferredMiddleware(get_wsgi_application())
