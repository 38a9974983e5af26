"""A Django project on disk as ``django-admin startproject mysite`` lays it out, for the
tests that start and reload it: its views are imported at the first request (Django
resolves its URLconf lazily), not when ``mysite.wsgi`` is imported."""

from __future__ import annotations

import shutil
from pathlib import Path

VIEWS = """
import os

{broken}
from django.http import HttpResponse


def hello(request):
    return HttpResponse("{version}")


def whoami(request):
    return HttpResponse(f"uid={{os.getuid()}}")
"""


def write(folder: Path, allowed_hosts: str = "*", sqlite: bool = False) -> None:
    """mysite/ in ``folder``: settings, urls (/hello, /whoami), wsgi, views at v1; with
    ``sqlite``, a db.sqlite3 in ``folder`` as ``manage.py migrate`` run as root leaves it."""
    site = folder / "mysite"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    database = (
        "{'default': {'ENGINE': 'django.db.backends.sqlite3', "
        "'NAME': Path(__file__).resolve().parent.parent / 'db.sqlite3'}}"
        if sqlite
        else "{}"
    )
    (site / "settings.py").write_text(
        "from pathlib import Path\n\n"
        f'SECRET_KEY = "x"\nDEBUG = False\nALLOWED_HOSTS = ["{allowed_hosts}"]\n'
        'ROOT_URLCONF = "mysite.urls"\nINSTALLED_APPS = []\nSTATIC_URL = "static/"\n'
        f"DATABASES = {database}\n"
    )
    (site / "urls.py").write_text(
        "from django.urls import path\n\nfrom mysite import views\n\n"
        'urlpatterns = [path("hello", views.hello), path("whoami", views.whoami)]\n'
    )
    (site / "wsgi.py").write_text(
        "import os\n\nfrom django.core.wsgi import get_wsgi_application\n\n"
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n'
        "application = get_wsgi_application()\n"
    )
    if sqlite:
        (folder / "db.sqlite3").write_bytes(b"")
        (folder / "db.sqlite3").chmod(0o644)
    views(folder, "v1")


def views(folder: Path, version: str, broken: bool = False) -> None:
    """views.py answering ``version`` at /hello; ``broken``: it imports a missing module."""
    text = VIEWS.format(version=version, broken="import no_such_module" if broken else "")
    (folder / "mysite" / "views.py").write_text(text)
    shutil.rmtree(folder / "mysite" / "__pycache__", ignore_errors=True)
