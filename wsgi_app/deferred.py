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

A request that failed (the app raised, a 5xx status, a body cut short) does not
run its deferred calls, as Starlette's background tasks do not: the work often
assumes what the request did (a row saved, a mail to confirm). ``defer_always``
registers a call that runs anyway; ``run_on_error`` does so for every call.
Either way the choice is logged.

The middleware knows nothing of the server beyond environ keys: it finishes
through ``fcgi.finish_request`` and registers its drain through
``fcgi.add_drain_hook``; under gunicorn, call ``drain()`` from ``worker_exit``.

Code with no environ at hand (a helper deep inside a view, a Django Tasks
backend) calls ``add_task(func, *args, **kwargs)``: the middleware keeps the
current request in a context variable while the app runs.

Each call runs in a copy of the context its ``defer()`` ran in, as Starlette's
background tasks do: what the request bound in context variables (structlog's
fields, Sentry's scope, OpenTelemetry's span) is there, and what the call sets
stays in its copy.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec

from .runtime.callpath import Unrecordable, volatile
from .runtime.calls import Batch, Call
from .runtime.cpus import set_allowed
from .runtime.executor import DeferredExecutor
from .runtime.tracing import log_fields

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

P = ParamSpec("P")

ENVIRON_KEY = "wsgi_app.deferred"
DURABLE_KEY = "wsgi_app.deferred.durable"  # the backend, when a journal or Celery is on
RECORDS_KEY = "wsgi_app.deferred.records"  # what the backend made of each call, once one defers

log = logging.getLogger("wsgi_app.deferred")

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


def _text(text: str) -> str:
    return text


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1 or 0 (true or false)")


@dataclass(frozen=True)
class Setting:
    """One middleware setting: keyword argument, environment variable, default, the
    converter that validates it (ValueError names the problem), and its meaning."""

    name: str
    env: str
    default: Any
    convert: Callable[[str], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "threads",
        "DEFERRED_THREADS",
        512,
        _count,
        "most plain functions running at once: the pool grows while calls block and "
        "shrinks when idle, so blocking calls (mail, HTTP) overlap without holding requests",
    ),
    Setting(
        "concurrency",
        "DEFERRED_CONCURRENCY",
        1000,
        _count,
        "most requests' batches awaiting coroutines at once (they interleave on one loop)",
    ),
    Setting(
        "backlog",
        "DEFERRED_BACKLOG",
        1000,
        _count,
        "calls waiting to start before each new batch is logged and counted as overflow; "
        "it still waits its turn, never dropped and never run on the serving thread",
    ),
    Setting(
        "slow",
        "DEFERRED_SLOW",
        0,
        _seconds,
        "log the stack of a call running longer than this many seconds (0: off)",
    ),
    Setting(
        "timeout",
        "DEFERRED_TIMEOUT",
        0,
        _seconds,
        "cancel a coroutine running longer than this many seconds (0: off)",
    ),
    Setting(
        "process",
        "DEFERRED_PROCESS",
        False,
        _flag,
        "run deferred calls in a helper process forked from the worker at its first call, "
        "outside the serving GIL; callables and arguments must pickle (others run in the "
        "worker) and open their connections themselves",
    ),
    Setting(
        "run_on_error",
        "DEFERRED_RUN_ON_ERROR",
        False,
        _flag,
        "run deferred calls of requests that failed (raised, 5xx, body cut short) too",
    ),
    Setting(
        "journal",
        "DEFERRED_JOURNAL",
        "",
        _text,
        "SQLite file recording each call before the response is finished, so it survives "
        "the worker's death (empty: memory only)",
    ),
    Setting(
        "attempts",
        "DEFERRED_ATTEMPTS",
        5,
        _count,
        "journal: runs of a failing call before it is kept as dead",
    ),
    Setting(
        "retry",
        "DEFERRED_RETRY",
        10,
        _seconds,
        "journal: seconds before a failed call runs again (doubling each time)",
    ),
    Setting(
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
    for setting in SETTINGS:
        value = given.get(setting.name)
        try:
            if value is None:
                raw = environ.get(setting.env)
                value = setting.default if raw is None else setting.convert(raw)
            else:
                value = setting.convert(str(value))
        except ValueError as exc:
            shown = environ.get(setting.env) if given.get(setting.name) is None else value
            raise ValueError(f"{setting.name} ({setting.env}) = {shown!r}: {exc}") from None
        values[setting.name] = value
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
        process: bool | None = None,
        run_on_error: bool | None = None,
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
            "process": process,
            "run_on_error": run_on_error,
            "journal": journal,
            "attempts": attempts,
            "retry": retry,
            "celery": celery,
        }
        values = _settings(given, os.environ)
        self.run_on_error: bool = values.pop("run_on_error")
        durable = {k: values.pop(k) for k in ("journal", "attempts", "retry", "celery")}
        self.executor = DeferredExecutor(**values)
        _executors.add(self.executor)
        self.backend = None
        self._hooked: list[Any] = [None, None]  # the add_drain_hook, add_stats_hook served
        if durable["journal"] or durable["celery"]:
            from .backends import backend_for  # only then: SQLite and Celery stay unimported

            self.backend = backend_for(durable, self.executor)
            self.backend.start()
        self._server_limits: object = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        batch = Batch(origin=_origin(environ), request_id=environ.get("fcgi.request_id", ""))
        environ[ENVIRON_KEY] = batch
        backend = self.backend
        # None too: a memory middleware inside a journaled one runs its batch in memory
        environ[DURABLE_KEY] = backend
        # The hooks go to each server once: ours offers the same callables to every request.
        add_drain_hook = environ.get("fcgi.add_drain_hook")
        if add_drain_hook is not None and add_drain_hook is not self._hooked[0]:
            if backend is not None:
                add_drain_hook(backend.stop)  # stop taking over others' calls first
            add_drain_hook(self.executor.drain)
            if backend is not None:
                add_drain_hook(backend.flush)  # the ends of the calls the drain finished
            self._hooked[0] = add_drain_hook
        add_stats_hook = environ.get("fcgi.add_stats_hook")
        if add_stats_hook is not None and add_stats_hook is not self._hooked[1]:
            add_stats_hook(self.executor.snapshot)
            if backend is not None:
                add_stats_hook(backend.stats)
            self._hooked[1] = add_stats_hook
        batch.on_done = environ.get("fcgi.log_deferred")  # the access log's second line
        limits = environ.get("fcgi.deferred_limits")
        if limits is not None and limits is not self._server_limits:
            self._server_limits = limits  # the worker's --slow-deferred, --deferred-timeout
            self.executor.configure(**{k: v for k, v in limits.items() if v})
            set_allowed(environ.get("fcgi.cpus", ()))  # for the helper and commands
        status: list[str] = []

        def watching_start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(s)
            return start_response(s, headers, exc_info)

        try:
            token = _current_environ.set(environ)
            try:
                result = self.app(environ, watching_start_response)
            finally:
                _current_environ.reset(token)
        except BaseException as exc:
            # the server answers the error (a 500, or a cut response): no finish here
            self._after(environ, batch, f"the app raised {type(exc).__name__}", finish=False)
            raise

        def after(failure: str | None) -> None:
            if failure is None and status and status[-1][:1] == "5":
                failure = status[-1]
            self._after(environ, batch, failure)

        if isinstance(result, list):
            return _ClosingList(result, after)
        return _ClosingIterable(result, after)

    def _after(
        self, environ: WSGIEnvironment, batch: Batch, failure: str | None, finish: bool = True
    ) -> None:
        """The response is over (``failure`` says why it went wrong, if it did): free the
        connection, then hand the request's calls to the executor."""
        batch.closed = True
        fields = environ.get("fcgi.log_fields")
        if fields is not None:
            fields["deferred"] = len(batch.calls)
        records = environ.get(RECORDS_KEY) if self.backend is not None else None
        if records:  # recorded before the visitor has the page
            if failure is not None:
                self._failed_request(batch, failure)
                failure = None
            self.backend.start()  # once per process: again in a forked child
            batch = self.backend.accept(batch, records)
        finish_request = environ.get("fcgi.finish_request")
        if finish and finish_request is not None:
            finish_request()
        if not batch.calls:
            return
        if failure is not None:
            self._failed_request(batch, failure)
        self.executor.submit(batch)

    def _failed_request(self, batch: Batch, failure: str) -> None:
        """Keep only the calls that run anyway, and log the choice."""
        if self.run_on_error:
            log.warning(
                "%s failed (%s): running its %d deferred call(s) anyway (run_on_error)",
                batch.label(),
                failure,
                len(batch.calls),
                extra=log_fields(batch, batch.calls[0]),
            )
            return
        kept = [call for call in batch.calls if call.always]
        skipped = [call for call in batch.calls if not call.always]
        batch.calls = kept
        self.executor.skip(len(skipped))
        log.warning(
            "%s failed (%s): skipping its deferred %s%s",
            batch.label(),
            failure,
            ", ".join(call.describe() for call in skipped),
            f"; running {len(kept)} registered with defer_always" if kept else "",
            extra=log_fields(batch, (skipped or kept)[0]),
        )

    def stats(self) -> dict[str, Any]:
        """Counters of this middleware's deferred work: queued, running, done, failed, ..."""
        return self.executor.snapshot()


class _ClosingList(list):
    """A list result (so servers may send it in one go) whose ``close()`` runs a hook,
    after the list's own ``close()`` if it has one (an inner middleware's)."""

    def __init__(self, items: list[bytes], hook: Callable[[str | None], None]) -> None:
        super().__init__(items)
        self._hook = hook
        self._close = getattr(items, "close", None)

    def close(self) -> None:
        try:
            if self._close is not None:
                self._close()
        finally:
            self._hook(None)


class _ClosingIterable:
    """Any other result: iterate it as is, close it, then run the hook, telling it
    whether the body was cut short (it raised, or the server stopped reading it)."""

    def __init__(self, result: Iterable[bytes], hook: Callable[[str | None], None]) -> None:
        self._result = result
        self._hook = hook
        self._failure: str | None = "the body was not sent to the end"

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._result
        except BaseException as exc:
            self._failure = f"the body raised {type(exc).__name__}"
            raise
        self._failure = None

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._hook(self._failure)


def _origin(environ: WSGIEnvironment) -> str:
    uri = environ.get("REQUEST_URI") or (
        environ.get("SCRIPT_NAME", "")
        + environ.get("PATH_INFO", "")
        + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
    )
    return f"{environ.get('REQUEST_METHOD', '-')} {uri}"


def _batch(environ: WSGIEnvironment) -> Batch:
    batch = environ.get(ENVIRON_KEY)
    if batch is None:
        raise RuntimeError(
            "defer() needs DeferredMiddleware around the app: application = DeferredMiddleware(app)"
        )
    if batch.closed:
        # appended now, it would run or not by chance, and no count would know of it
        raise RuntimeError(
            f"defer() after the response ended: {batch.label()}'s calls were already "
            "handed over; call the function directly (deferred work is already after the "
            "response)"
        )
    return batch


def _add(environ: WSGIEnvironment, func: Callable[..., Any], args: Any, kwargs: Any, always: bool):
    """Append the call to the request's batch; with a journal or Celery, encode it now so
    that a call which cannot travel fails here (``Unrecordable``), naming itself."""
    batch = _batch(environ)
    context = contextvars.copy_context()  # the call runs in it (runtime/calls.py)
    context.run(_current_environ.set, None)  # there, no request's app call is running
    if isinstance(func, volatile):
        call = Call(func.func, args, kwargs, always=always, context=context)
    else:
        call = Call(func, args, kwargs, always=always, context=context)
        backend = environ.get(DURABLE_KEY)
        if backend is not None:
            record = (call, backend.encode(func, args, kwargs))
            records = environ.get(RECORDS_KEY)
            if records is None:
                environ[RECORDS_KEY] = [record]
            else:
                records.append(record)
    batch.calls.append(call)


def defer(
    environ: WSGIEnvironment, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Run ``func(*args, **kwargs)`` after this request's response; coroutine functions
    are awaited. Failures are logged with the request they came from. Skipped if the
    request fails (see ``defer_always``).

    With a journal or Celery on, ``func`` must be importable by name and its arguments
    serializable, or ``Unrecordable`` is raised here; ``defer(environ, volatile(func))``
    opts out: that call runs in this worker's memory only, and may be lost."""
    _add(environ, func, args, kwargs, False)


def defer_always(
    environ: WSGIEnvironment, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
) -> None:
    """``defer``, but the call runs even if the request fails (an audit line, a
    cleanup that must happen either way)."""
    _add(environ, func, args, kwargs, True)


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


__all__ = [
    "DeferredMiddleware",
    "Unrecordable",
    "defer",
    "defer_always",
    "drain",
    "finish_request",
    "volatile",
]
