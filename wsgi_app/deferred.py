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
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec

from .callpath import Unrecordable, volatile
from .executor import Batch, Call, DeferredExecutor

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

P = ParamSpec("P")

ENVIRON_KEY = "wsgi_app.deferred"
DURABLE_KEY = "wsgi_app.deferred.durable"  # (engine, records) when a journal or Celery is on


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _text(text: str) -> str:
    return text


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
    (
        "journal",
        "DEFERRED_JOURNAL",
        "",
        _text,
        "SQLite file recording each call before the response is finished, so it survives "
        "the worker's death (empty: memory only)",
    ),
    (
        "attempts",
        "DEFERRED_ATTEMPTS",
        5,
        _count,
        "journal: runs of a failing call before it is kept as dead",
    ),
    (
        "retry",
        "DEFERRED_RETRY",
        10,
        _seconds,
        "journal: seconds before a failed call runs again (doubling each time)",
    ),
    (
        "celery",
        "DEFERRED_CELERY",
        "",
        _text,
        "Celery broker URL: hand the calls to `celery -A wsgi_app.celery worker` instead",
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
        journal: str | os.PathLike[str] | None = None,
        attempts: int | None = None,
        retry: float | None = None,
        celery: str | None = None,
    ) -> None:
        self.app = app
        given = {
            "threads": threads,
            "concurrency": concurrency,
            "backlog": backlog,
            "slow": slow,
            "timeout": timeout,
            "journal": journal,
            "attempts": attempts,
            "retry": retry,
            "celery": celery,
        }
        settings = _settings(given, os.environ)
        durable = {k: settings.pop(k) for k in ("journal", "attempts", "retry", "celery")}
        self.executor = DeferredExecutor(**settings)
        _executors.add(self.executor)
        self.engine = None
        if durable["journal"] or durable["celery"]:
            from .engines import engine_for  # only then: Celery and SQLite stay unimported

            self.engine = engine_for(durable, self.executor)
            self.engine.start()
        self._server_limits: object = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        batch = Batch(origin=_origin(environ))
        environ[ENVIRON_KEY] = batch
        engine = self.engine
        if engine is not None:
            environ[DURABLE_KEY] = (engine, [])
            engine.start()  # once per process (again in a forked child)
        add_drain_hook = environ.get("fcgi.add_drain_hook")
        if add_drain_hook is not None:  # the server keeps each hook once
            if engine is not None and hasattr(engine, "sweeper"):
                add_drain_hook(engine.sweeper.stop)  # stop taking over before draining
            add_drain_hook(self.executor.drain)
            environ["fcgi.add_stats_hook"](self.executor.snapshot)
            if engine is not None:
                environ["fcgi.add_stats_hook"](engine.stats)
        batch.on_done = environ.get("fcgi.log_deferred")  # the access log's second line
        limits = environ.get("fcgi.deferred_limits")
        if limits is not None and limits is not self._server_limits:
            self._server_limits = limits  # the worker's --slow-deferred, --deferred-timeout
            self.executor.configure(**{k: v for k, v in limits.items() if v})
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self._after(environ, batch)
            raise
        if isinstance(result, list):
            return _ClosingList(result, lambda: self._after(environ, batch))
        return _ClosingIterable(result, lambda: self._after(environ, batch))

    def _after(self, environ: WSGIEnvironment, batch: Batch) -> None:
        fields = environ.get("fcgi.log_fields")
        if fields is not None:
            fields["deferred"] = len(batch.calls)
        durable = environ.get(DURABLE_KEY)
        if durable is not None and durable[1]:  # recorded before the visitor has the page
            batch = durable[0].accept(batch, durable[1])
        finish = environ.get("fcgi.finish_request")
        if finish is not None:
            finish()
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
    are awaited. Failures are logged with the request they came from.

    With a journal or Celery, ``func`` must be importable by name and its arguments
    serializable, or ``Unrecordable`` is raised here; ``defer(environ, volatile(func))``
    opts out (that call runs in this worker's memory and may be lost)."""
    batch = environ.get(ENVIRON_KEY)
    if batch is None:
        raise RuntimeError(
            "defer() needs DeferredMiddleware around the app: application = DeferredMiddleware(app)"
        )
    if isinstance(func, volatile):
        func = func.func
    else:
        durable = environ.get(DURABLE_KEY)
        if durable is not None:
            durable[1].append((len(batch.calls), durable[0].encode(func, args, kwargs)))
    batch.calls.append(Call(func, args, kwargs))


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


__all__ = [
    "DeferredMiddleware",
    "Unrecordable",
    "defer",
    "drain",
    "finish_request",
    "volatile",
]
