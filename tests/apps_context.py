"""Apps and deferred calls for the tests of the context deferred work runs in
(tests/test_context.py, tests/test_tracing.py).

A request-id middleware's shape binds ``?tag=`` in a context variable for the app
call and resets it after, as structlog's ``bind_contextvars`` or Sentry's scope
would; the view defers the calls named in ``?calls=`` (module-level, so the journal
can record them), each recording the tag it sees and the thread it ran on.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from urllib.parse import parse_qs

from wsgi_app.deferred import DeferredMiddleware, add_task, current_environ, defer, defer_always

request_tag: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="<none>")
seen: list[tuple[str, str, int]] = []  # (name, tag seen, thread ident)


def record(name: str) -> None:
    seen.append((name, request_tag.get(), threading.get_ident()))


def record_and_change(name: str) -> None:
    """Records, then sets the variable: only its own copy of the context changes."""
    record(name)
    request_tag.set(f"changed by {name}")


async def arecord(name: str) -> None:
    await asyncio.sleep(0)
    record(name)


async def arecord_and_change(name: str) -> None:
    await arecord(name)
    request_tag.set(f"changed by {name}")


def outside_a_request(name: str) -> None:
    """Deferred work is after the app call: no current request there, whatever the
    context it runs in."""
    try:
        add_task(record, name)
    except RuntimeError:
        seen.append((name, f"outside, current_environ {current_environ()}", 0))


CALLS = {
    f.__name__: f
    for f in (record, record_and_change, arecord, arecord_and_change, outside_a_request)
}


def tagged(app):
    """Bind ``?tag=`` for the app call, then reset it: the context outlives nothing."""

    def bind(environ, start_response):
        tag = parse_qs(environ.get("QUERY_STRING", "")).get("tag")
        token = request_tag.set(tag[0]) if tag else None
        try:
            return app(environ, start_response)
        finally:
            if token is not None:
                request_tag.reset(token)

    return bind


def view(environ, start_response):
    """``?calls=a,b&how=defer|add_task|defer_always&fail=1``: defer each of ``calls``
    (named ``TAG/FUNC``), then answer 200, or 500 with ``fail``."""
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    how = query.get("how", "defer")
    for name in query.get("calls", "record").split(","):
        label = f"{query.get('tag', '-')}/{name}"
        if how == "add_task":
            add_task(CALLS[name], label)
        elif how == "defer_always":
            defer_always(environ, CALLS[name], label)
        else:
            defer(environ, CALLS[name], label)
    status = "500 Internal Server Error" if query.get("fail") else "200 OK"
    start_response(status, [("Content-Type", "text/plain")])
    return [b"ok\n"]


def make(**settings) -> DeferredMiddleware:
    """The view under the middleware (``settings``: its own), under the binding."""
    middleware = DeferredMiddleware(view, **settings)
    middleware.tagged = tagged(middleware)
    return middleware
