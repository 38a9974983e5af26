"""Run work after the response: PHP's ``fastcgi_finish_request()`` for any WSGI app.

Wrap the app, then register work from inside a request::

    from wsgi_app.deferred import DeferredMiddleware, defer

    def app(environ, start_response):
        defer(environ, send_mail, "ada@example.org", subject="Welcome")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"signed up\\n"]

    application = DeferredMiddleware(app)

After the last body byte, the middleware calls ``environ["fcgi.finish_request"]``
when the server offers it (the visitor has the whole page and the connection is
free), then hands the request's callables to a bounded executor in this worker
process. Under other servers (gunicorn, wsgiref) the same happens from the
response's ``close()``, so the worker takes its next request at once.

The middleware knows nothing of the server beyond environ keys: it finishes
through ``fcgi.finish_request`` and registers its drain through
``fcgi.add_drain_hook``; under gunicorn, call ``drain()`` from ``worker_exit``.

Code with no environ at hand (a helper deep inside a view, a Django Tasks
backend) calls ``add_task(func, *args, **kwargs)``: the middleware keeps the
current request in a context variable while the app runs.
"""

from __future__ import annotations

import contextvars
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec

from .executor import Batch, Call, DeferredExecutor

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

P = ParamSpec("P")

ENVIRON_KEY = "wsgi_app.deferred"

# The environ of the request whose app call is running in this thread (or task), for
# add_task(); set only around the app call, so deferred work and streamed bodies see None.
_current_environ: contextvars.ContextVar[WSGIEnvironment | None] = contextvars.ContextVar(
    "wsgi_app.deferred.current_environ", default=None
)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be a number of seconds, or 0 for off")
    return value


# name, environment variable, default, converter, meaning: the middleware's settings.
SETTINGS = (
    (
        "threads",
        "DEFERRED_THREADS",
        4,
        _count,
        "plain functions running at once (mail, webhooks: I/O-bound, so a few overlap well)",
    ),
    (
        "concurrency",
        "DEFERRED_CONCURRENCY",
        100,
        _count,
        "requests' batches in progress at once (coroutines interleave on one loop)",
    ),
    (
        "backlog",
        "DEFERRED_BACKLOG",
        1000,
        _count,
        "calls waiting to start; beyond it the finishing request's thread runs its own batch",
    ),
    (
        "slow",
        "DEFERRED_SLOW",
        0,
        _seconds,
        "log the stack of a call running longer than this many seconds (0: off)",
    ),
    (
        "timeout",
        "DEFERRED_TIMEOUT",
        0,
        _seconds,
        "cancel a coroutine running longer than this many seconds (0: off)",
    ),
)

_executors: weakref.WeakSet[DeferredExecutor] = weakref.WeakSet()


def _settings(given: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments first, then the environment, then the defaults; errors name both."""
    values = {}
    for name, env, default, convert, _meaning in SETTINGS:
        value = given.get(name)
        try:
            if value is None:
                value = convert(environ[env]) if env in environ else default
            else:
                value = convert(str(value))
        except ValueError as exc:
            shown = environ.get(env) if given.get(name) is None else value
            raise ValueError(f"{name} ({env}) = {shown!r}: {exc}") from None
        values[name] = value
    return values


class DeferredMiddleware:
    """Give the wrapped app ``defer()`` and ``finish_request()``; run deferred work after
    the response, in this worker, in registration order per request."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        threads: int | None = None,
        concurrency: int | None = None,
        backlog: int | None = None,
        slow: float | None = None,
        timeout: float | None = None,
    ) -> None:
        self.app = app
        given = {
            "threads": threads,
            "concurrency": concurrency,
            "backlog": backlog,
            "slow": slow,
            "timeout": timeout,
        }
        self.executor = DeferredExecutor(**_settings(given, os.environ))
        _executors.add(self.executor)
        self._server_limits: object = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        batch = Batch(origin=_origin(environ))
        environ[ENVIRON_KEY] = batch
        add_drain_hook = environ.get("fcgi.add_drain_hook")
        if add_drain_hook is not None:  # the server keeps each hook once
            add_drain_hook(self.executor.drain)
            environ["fcgi.add_stats_hook"](self.executor.snapshot)
        batch.on_done = environ.get("fcgi.log_deferred")  # the access log's second line
        limits = environ.get("fcgi.deferred_limits")
        if limits is not None and limits is not self._server_limits:
            self._server_limits = limits  # the worker's --slow-deferred, --deferred-timeout
            self.executor.configure(**{k: v for k, v in limits.items() if v})
        try:
            token = _current_environ.set(environ)
            try:
                result = self.app(environ, start_response)
            finally:
                _current_environ.reset(token)
        except BaseException:
            self._after(environ, batch, finish=False)  # the server answers the error
            raise
        if isinstance(result, list):
            return _ClosingList(result, lambda: self._after(environ, batch))
        return _ClosingIterable(result, lambda: self._after(environ, batch))

    def _after(self, environ: WSGIEnvironment, batch: Batch, finish: bool = True) -> None:
        fields = environ.get("fcgi.log_fields")
        if fields is not None:
            fields["deferred"] = len(batch.calls)
        finish_request = environ.get("fcgi.finish_request")
        if finish and finish_request is not None:
            finish_request()
        if batch.calls:
            self.executor.submit(batch)

    def stats(self) -> dict[str, Any]:
        """Counters of this middleware's deferred work: queued, running, done, failed, ..."""
        return self.executor.snapshot()


class _ClosingList(list):
    """A list result (so servers may send it in one go) whose ``close()`` runs a hook."""

    def __init__(self, items: list[bytes], hook: Callable[[], None]) -> None:
        super().__init__(items)
        self._hook = hook

    def close(self) -> None:
        self._hook()


class _ClosingIterable:
    """Any other result: iterate it as is, close it, then run the hook."""

    def __init__(self, result: Iterable[bytes], hook: Callable[[], None]) -> None:
        self._result = result
        self._hook = hook

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._hook()


def _origin(environ: WSGIEnvironment) -> str:
    uri = environ.get("REQUEST_URI") or (
        environ.get("SCRIPT_NAME", "")
        + environ.get("PATH_INFO", "")
        + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
    )
    return f"{environ.get('REQUEST_METHOD', '-')} {uri}"


def defer(
    environ: WSGIEnvironment, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Run ``func(*args, **kwargs)`` after this request's response; coroutine functions
    are awaited. Failures are logged with the request they came from."""
    batch = environ.get(ENVIRON_KEY)
    if batch is None:
        raise RuntimeError(
            "defer() needs DeferredMiddleware around the app: application = DeferredMiddleware(app)"
        )
    batch.calls.append(Call(func, args, kwargs))


def add_task(func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
    """``defer()`` onto the request being served, found without its environ: callable from
    anywhere inside the app call (a view, or code deep below it), like Starlette's
    ``BackgroundTasks.add_task``. Outside one (deferred work, a shell) it raises RuntimeError."""
    environ = _current_environ.get()
    if environ is None:
        raise RuntimeError(
            "add_task() runs only inside a request served through DeferredMiddleware "
            "(not in deferred work, a streamed body, a shell or a test without a request)"
        )
    defer(environ, func, *args, **kwargs)


def current_environ() -> WSGIEnvironment | None:
    """The environ of the request whose app call is running here, or None outside one."""
    return _current_environ.get()


def finish_request(environ: WSGIEnvironment) -> bool:
    """Send the response so far and free the connection now, like PHP's
    ``fastcgi_finish_request()``. False on a server that cannot finish early
    (or when already finished); the app then goes on as usual."""
    finish = environ.get("fcgi.finish_request")
    return bool(finish()) if finish is not None else False


def drain(timeout: float = 30.0) -> int:
    """Finish accepted deferred work of every middleware in this process, up to
    ``timeout`` seconds; returns the calls abandoned. For gunicorn's ``worker_exit``."""
    deadline = time.monotonic() + timeout
    return sum(
        executor.drain(max(0.0, deadline - time.monotonic())) for executor in list(_executors)
    )
