"""Flask: deferred work that runs inside the application context, with no environ to pass.

::

    from flask import Flask, current_app
    from wsgi_app.flask_support import FlaskDeferred, defer_in_app

    app = Flask(__name__)
    FlaskDeferred(app)  # wraps app.wsgi_app in DeferredMiddleware

    def send_welcome(address):
        mailer = current_app.extensions["mail"]  # the app context is there
        ...

    @app.post("/signup")
    def signup():
        defer_in_app(send_welcome, request.form["email"])
        return "welcome"

Flask pops its contexts before the response is closed, so the deferred call
gets a fresh application context of the same app: ``current_app``, its config
and extensions work (and tear down after the call), and ``g`` is a new, empty
one. Like any deferred call it runs in the request's context as it was at
``defer_in_app()``, and Flask keeps its request context in a context variable
too: ``request`` is still the finished request (its arguments and headers can
be read, its body is gone, a change to ``session`` is never saved), so pass
what the call needs as arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec

from flask import Flask, current_app, has_app_context

from .deferred import DeferredMiddleware, add_task, current_environ, volatile

P = ParamSpec("P")

__all__ = ["FlaskDeferred", "defer_in_app"]


class FlaskDeferred:
    """The Flask extension: ``FlaskDeferred(app)`` or ``init_app(app)`` in a factory wraps
    ``app.wsgi_app`` in ``DeferredMiddleware`` (keyword arguments are its settings) and
    keeps the ``Flask`` object as it is (routes, ``app.run``, the test client)."""

    def __init__(self, app: Flask | None = None, **settings: Any) -> None:
        self.settings = settings
        self.middleware: DeferredMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        self.middleware = DeferredMiddleware(app.wsgi_app, **self.settings)
        app.wsgi_app = self.middleware  # type: ignore[method-assign]
        app.extensions["fcgi_finish"] = self


def defer_in_app(func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
    """Run ``func(*args, **kwargs)`` after this request's response, inside a fresh
    application context of the current app; coroutine functions are awaited. Call it
    anywhere inside a Flask request served through ``DeferredMiddleware``. The call
    runs in this worker's memory even with the journal or Celery on (``volatile``):
    for durable work, ``defer`` a module-level function that pushes its own app context."""
    if current_environ() is None or not has_app_context():
        raise RuntimeError(
            "defer_in_app() runs only inside a Flask request served through DeferredMiddleware "
            "(FlaskDeferred(app), or app.wsgi_app = DeferredMiddleware(app.wsgi_app))"
        )
    # The app object cannot be journaled or sent to Celery: the call stays in memory.
    add_task(volatile(_in_app_context(current_app._get_current_object(), func)), *args, **kwargs)


def _in_app_context(app: Flask, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` run inside ``app.app_context()``, under ``func``'s own name in the logs."""
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return await func(*args, **kwargs)

        return run_async

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with app.app_context():
            return func(*args, **kwargs)

    return run
