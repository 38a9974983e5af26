"""Apps for the multiplexing tests (tests/test_e2e_haproxy.py)."""

from __future__ import annotations

import time

from tests.apps import router


def slow_or_router(environ, start_response):
    """``/slow?S``: sleep S seconds in the app, then echo the body; others: ``apps.router``
    (so requests overlap and a web server must run them at once)."""
    if environ["PATH_INFO"] == "/slow":
        time.sleep(float(environ.get("QUERY_STRING") or 0))
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    return router(environ, start_response)
