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
assumes what the request did (a row saved, a mail to confirm). A visitor who
leaves in the middle of a streamed body cuts it short too: the server stops
pulling it. ``defer_always`` registers a call that runs anyway; ``run_on_error``
does so for every call. Either way the choice is logged.

The middleware knows nothing of the server beyond environ keys: it finishes
through ``fcgi.finish_request`` and registers its drain through
``fcgi.add_drain_hook``; under gunicorn, call ``drain()`` from ``worker_exit``.
The FastCGI worker offers the same keys before its first request to an app object
with an ``fcgi_startup(extensions)`` method, as this middleware has: put it
outermost, or its hooks reach the worker with the first request.

With a journal (or Celery), a call is recorded before any part of the response
that follows it can reach the visitor: the calls deferred so far are written (one
write) when the app returns its list, before each chunk of a streamed body, before
a ``write()``, and before a ``finish_request()`` (the app gets the middleware's
own ``fcgi.finish_request``, which records first); once any of these has
happened, a ``defer()`` is recorded at once. So "the visitor has the page" always
means "the calls are in the journal", whichever way the response ends.

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
import sys
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
DURABLE_KEY = "wsgi_app.deferred.durable"  # the request's _Recorder, when a backend is on

log = logging.getLogger("wsgi_app.deferred")

# The environ of the request whose app call is running in this thread (or task), for
# add_task(); set only around the app call, so deferred work and streamed bodies see None.
_current_environ: contextvars.ContextVar[WSGIEnvironment | None] = contextvars.ContextVar(
    "wsgi_app.deferred.current_environ", default=None
)


class SettingError(ValueError):
    """A setting with a value it cannot take; the message names the setting and why.
    ``setup_error``: a worker loading the app prints it as one line and exits 2."""

    setup_error = True


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
    converter that validates it (ValueError names the problem), its meaning, and the form
    a value takes (N, SECONDS, ...), which an error names."""

    name: str
    env: str
    default: Any
    convert: Callable[[str], Any]
    help: str
    metavar: str = "VALUE"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "threads",
        "DEFERRED_THREADS",
        512,
        _count,
        "most plain functions running at once: the pool grows while calls block and "
        "shrinks when idle, so blocking calls (mail, HTTP) overlap without holding requests",
        "N",
    ),
    Setting(
        "concurrency",
        "DEFERRED_CONCURRENCY",
        1000,
        _count,
        "most requests' batches awaiting coroutines at once (they interleave on one loop)",
        "N",
    ),
    Setting(
        "backlog",
        "DEFERRED_BACKLOG",
        1000,
        _count,
        "calls waiting to start before each new batch is logged and counted as overflow; "
        "it still waits its turn, never dropped and never run on the serving thread",
        "N",
    ),
    Setting(
        "slow",
        "DEFERRED_SLOW",
        0,
        _seconds,
        "log the stack of a call running longer than this many seconds (0: off)",
        "SECONDS",
    ),
    Setting(
        "timeout",
        "DEFERRED_TIMEOUT",
        0,
        _seconds,
        "cancel a coroutine running longer than this many seconds (0: off)",
        "SECONDS",
    ),
    Setting(
        "process",
        "DEFERRED_PROCESS",
        False,
        _flag,
        "run deferred calls in a helper process forked from the worker at its first call, "
        "outside the serving GIL; callables and arguments must pickle (others run in the "
        "worker) and open their connections themselves",
        "1|0",
    ),
    Setting(
        "run_on_error",
        "DEFERRED_RUN_ON_ERROR",
        False,
        _flag,
        "run deferred calls of requests that failed (raised, 5xx, body cut short) too",
        "1|0",
    ),
    Setting(
        "journal",
        "DEFERRED_JOURNAL",
        "",
        _text,
        "SQLite file recording each call before the visitor has the response, so it "
        "survives the worker's death; one per app, private to the workers' user (empty: "
        "memory only)",
        "FILE",
    ),
    Setting(
        "app_name",
        "DEFERRED_APP",
        "",
        _text,
        "journal: the name of the app its calls belong to; a worker takes over only its "
        "own app's calls (empty: the FastCGI worker's MODULE:CALLABLE and folder; under "
        "other servers, the file of the module that built the middleware)",
        "NAME",
    ),
    Setting(
        "attempts",
        "DEFERRED_ATTEMPTS",
        5,
        _count,
        "journal: failures of a call (it raised, or its worker died while it ran) before "
        "it is kept as dead; a reload or a stop uses none",
        "N",
    ),
    Setting(
        "retry",
        "DEFERRED_RETRY",
        10,
        _seconds,
        "journal: seconds before a failed call runs again (doubling each time)",
        "SECONDS",
    ),
    Setting(
        "celery",
        "DEFERRED_CELERY",
        "",
        _text,
        "Celery broker URL: hand the calls to `celery -A wsgi_app.celery worker` instead; "
        "with a journal too, the journal is Celery's outbox (nothing lost before publishing)",
        "URL",
    ),
)

_executors: weakref.WeakSet[DeferredExecutor] = weakref.WeakSet()
_pid = [os.getpid()]  # this process's, kept current across forks (getpid() is a system call)
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
_middlewares: weakref.WeakSet[DeferredMiddleware] = weakref.WeakSet()


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
            raise SettingError(f"{setting.name} ({setting.env}) = {shown!r}: {exc}") from None
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
        app_name: str | None = None,
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
            "app_name": app_name,
            "attempts": attempts,
            "retry": retry,
            "celery": celery,
        }
        values = _settings(given, os.environ)
        self.run_on_error: bool = values.pop("run_on_error")
        durable = {k: values.pop(k) for k in ("journal", "app_name", "attempts", "retry", "celery")}
        self._named = bool(durable["app_name"])  # the app_name setting: no other name wins
        durable["app"] = durable.pop("app_name") or _builder()
        self.executor = DeferredExecutor(**values)
        _executors.add(self.executor)
        self.backend = None
        self._hooked: list[Any] = [None, None]  # the add_drain_hook, add_stats_hook served
        if durable["journal"] or durable["celery"]:
            from .backends import backend_for  # only then: SQLite and Celery stay unimported

            self.backend = backend_for(durable, self.executor)
            self.backend.start()
        self._server_limits: object = None
        self._served = 0  # the pid in which the app was first served (the backend told)
        _middlewares.add(self)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        batch = Batch(origin=_origin(environ), request_id=environ.get("fcgi.request_id", ""))
        environ[ENVIRON_KEY] = batch
        backend = self.backend
        status: list[str] = []
        recorder = None
        if backend is not None:
            recorder = _Recorder(backend, batch, status, self.run_on_error)
            server_finish = environ.get("fcgi.finish_request")
            if server_finish is not None:  # the app's finish records first
                recorder.server_finish = server_finish
                environ["fcgi.finish_request"] = recorder.finish
        # None too: a memory middleware inside a journaled one runs its batch in memory
        environ[DURABLE_KEY] = recorder
        self._hook_server(environ, backend)
        if backend is not None and self._served != _pid[0]:
            self._serving()
        batch.on_done = environ.get("fcgi.log_deferred")  # the access log's second line

        def watching_start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(s)
            write = start_response(s, headers, exc_info)
            if recorder is None:
                return write
            recorder.server_write = write
            return recorder.write  # records first

        try:
            token = _current_environ.set(environ)
            try:
                result = self.app(environ, watching_start_response)
            finally:
                _current_environ.reset(token)
        except BaseException as exc:
            # the server answers the error (a 500, or a cut response): no finish here
            self._after(environ, batch, recorder, f"the app raised {type(exc).__name__}", None)
            raise

        finish = environ.get("fcgi.finish_request")  # the recorder's, when there is one

        def after(failure: str | None) -> None:
            if failure is None and status and status[-1][:1] == "5":
                failure = status[-1]
            self._after(environ, batch, recorder, failure, finish)

        if isinstance(result, list):
            if recorder is not None:
                recorder.expose()  # the server sends it next
            return _ClosingList(result, after)
        if type(result) is environ.get("wsgi.file_wrapper") and "fcgi.finish_request" in environ:
            # The worker's own wrapper, kept so the worker sends the file its fast way: it
            # leaves the file's position where the sending stopped, which tells a body sent
            # to the end (another server's, gunicorn's sendfile, may leave it at the start).
            if recorder is not None:
                recorder.expose()  # the server sends it next
            result.filelike = _ClosingFile(result.filelike, after)  # type: ignore[attr-defined]
            return result
        return _ClosingIterable(result, after, recorder)

    def fcgi_startup(self, extensions: Mapping[str, Any]) -> None:
        """The worker's ``fcgi.*`` extensions before its first request: the drain and
        stats hooks reach it now (a worker that serves nothing yet must still drain its
        deferred work); handed on to the wrapped app if it takes them too."""
        self._hook_server(extensions, self.backend)
        self._serving()
        inner = getattr(self.app, "fcgi_startup", None)
        if callable(inner):
            inner(extensions)

    def _serving(self) -> None:
        """The app is served in this process: a journal takes calls over from now on (a
        process that only imports the app, such as a reload's import check, takes none)."""
        self._served = _pid[0]
        if self.backend is not None:
            self.backend.serve()

    def _hook_server(self, environ: Mapping[str, Any], backend: Any) -> None:
        """Give each server the hooks once (ours offers the same callables to every
        request); take the app's name from it (``fcgi.app``) unless a setting gave one."""
        served = environ.get("fcgi.app")
        if served and served.get("spec") and backend is not None and not self._named:
            self._named = True  # before any claim: _serving() follows
            backend.name_app(f"{served['spec']} in {served['folder']}")
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
        limits = environ.get("fcgi.deferred_limits")
        if limits is not None and limits is not self._server_limits:
            self._server_limits = limits  # the worker's --slow-deferred, --deferred-timeout
            self.executor.configure(**{k: v for k, v in limits.items() if v})
            set_allowed(environ.get("fcgi.cpus", ()))  # for the helper and commands

    def _after(
        self,
        environ: WSGIEnvironment,
        batch: Batch,
        recorder: _Recorder | None,
        failure: str | None,
        finish: Callable[[], Any] | None,
    ) -> None:
        """The response is over (``failure`` says why it went wrong, if it did): record
        what is not yet, free the connection (``finish``), then hand the request's calls
        to the backend and the executor."""
        batch.closed = True
        fields = environ.get("fcgi.log_fields")
        if fields is not None:
            fields["deferred"] = len(batch.calls)
        if failure is not None:
            self._failed_request(batch, failure)
        records = recorder.settle(failure is not None) if recorder is not None else ()
        if finish is not None:
            finish()
        if recorder is not None and records:
            self.backend.start()  # once per process: again in a forked child
            batch = self.backend.accept(batch, records)
        self.executor.submit(batch)

    def _failed_request(self, batch: Batch, failure: str) -> None:
        """Keep only the calls that run anyway, and log the choice."""
        if not batch.calls:
            return
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


class _Recorder:
    """A request's calls on their way to the backend (journal, Celery): each is recorded
    before any part of the response that follows it can reach the visitor."""

    __slots__ = (
        "backend",
        "batch",
        "exposed",
        "records",
        "run_on_error",
        "server_finish",
        "server_write",
        "status",
        "unrecorded",
    )

    def __init__(self, backend: Any, batch: Batch, status: list[str], run_on_error: bool) -> None:
        self.backend = backend
        self.batch = batch
        self.status = status
        self.run_on_error = run_on_error
        self.records: list[tuple[Call, Any]] = []  # every call that travels, in order
        self.unrecorded = 0  # index of the first not yet recorded
        self.exposed = False  # some of the response may be out: record each defer() at once
        self.server_finish: Callable[[], Any] | None = None
        self.server_write: Callable[[bytes], Any] | None = None

    def add(self, call: Call, record: Any) -> None:
        self.records.append((call, record))
        if self.exposed:
            try:
                self._record()
            except BaseException:  # not recorded (a full disk): not deferred either
                self.records.remove((call, record))
                raise

    def expose(self) -> None:
        """Part of the response is about to go out: record what was deferred until now."""
        self.exposed = True
        if self.unrecorded < len(self.records):
            self._record()

    def finish(self) -> bool:
        """``environ["fcgi.finish_request"]`` as the app sees it: record, then finish."""
        self.exposed = True
        if self.unrecorded < len(self.records):
            self._record()
        assert self.server_finish is not None
        return bool(self.server_finish())

    def write(self, data: bytes) -> Any:
        """start_response's ``write`` as the app sees it: record, then write."""
        self.expose()
        assert self.server_write is not None
        return self.server_write(data)

    def _record(self) -> None:
        """One write for the calls not yet recorded; of a request that failed (a 5xx
        status), only those that run anyway."""
        failed = bool(self.status) and self.status[-1][:1] == "5" and not self.run_on_error
        new = self.records[self.unrecorded :]
        if failed:
            new = [(call, record) for call, record in new if call.always]
        if new:
            self.backend.record(self.batch, new)
        self.unrecorded = len(self.records)

    def settle(self, failed: bool) -> list[tuple[Call, Any]]:
        """The response is over (``failed``: a failure may have dropped calls): record
        what is left of the batch, forget what was recorded of the calls dropped; the
        records of the calls that go on."""
        if not self.records:
            return self.records  # most requests: nothing deferred
        if not failed:  # every call goes on
            if self.unrecorded < len(self.records):
                self._record()
            return self.records
        kept = set(self.batch.calls)
        recorded = self.records[: self.unrecorded]
        dropped = [call for call, _ in recorded if call not in kept]
        if dropped:
            self.backend.forget(dropped)
        rest = [(call, record) for call, record in self.records[self.unrecorded :] if call in kept]
        if rest:
            self.backend.record(self.batch, rest)
        self.unrecorded = len(self.records)
        return [(call, record) for call, record in self.records if call in kept]


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
    """Any other result: iterate it as is (recording what was deferred before each
    chunk goes out), close it, then run the hook, telling it whether the body was cut
    short (it raised, or the server stopped reading it)."""

    def __init__(
        self,
        result: Iterable[bytes],
        hook: Callable[[str | None], None],
        recorder: _Recorder | None,
    ) -> None:
        self._result = result
        self._hook = hook
        self._recorder = recorder
        self._failure: str | None = "the body was not sent to the end"

    def __iter__(self) -> Iterator[bytes]:
        recorder = self._recorder
        try:
            if recorder is None:
                yield from self._result
            else:
                for chunk in self._result:
                    recorder.expose()
                    yield chunk
        except GeneratorExit:  # the server stopped pulling (the visitor left): not sent
            raise
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


class _ClosingFile:
    """The file inside a server's ``wsgi.file_wrapper``, its ``close()`` running the hook:
    the body was sent to the end when the file's position is at its end (a server
    sending it its own way leaves the position where it stopped)."""

    def __init__(self, file: Any, hook: Callable[[str | None], None]) -> None:
        self._file = file
        self._hook = hook

    def __getattr__(self, name: str) -> Any:  # read, readinto, fileno, tell, seek...
        return getattr(self._file, name)

    def close(self) -> None:
        failure = None
        try:
            at, end = self._file.tell(), self._file.seek(0, os.SEEK_END)
            if at < end:
                failure = "the body was not sent to the end"
        except (AttributeError, OSError, ValueError):
            pass  # not seekable: nothing to tell by
        try:
            self._file.close()
        finally:
            self._hook(failure)


def _builder() -> str:
    """The app a journal's calls belong to when no setting names it: the file of the
    module that built the middleware (the app's own module under any server), or that
    module's name and the working folder."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name not in _BUILDERS and not name.startswith(("importlib", "_frozen_importlib")):
            break
        frame = frame.f_back
    if frame is None:
        return f"? in {os.getcwd()}"
    file = frame.f_globals.get("__file__")
    if file:
        return os.path.realpath(file)
    return f"{frame.f_globals.get('__name__', '?')} in {os.getcwd()}"


# modules that build a middleware for the app that calls them
_BUILDERS = frozenset({__name__, "wsgi_app.flask_support", "wsgi_app.django_tasks"})


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
        batch.calls.append(Call(func.func, args, kwargs, always=always, context=context))
        return
    call = Call(func, args, kwargs, always=always, context=context)
    recorder = environ.get(DURABLE_KEY)
    if recorder is None:
        batch.calls.append(call)
        return
    record = recorder.backend.encode(call)
    batch.calls.append(call)
    try:
        recorder.add(call, record)  # recorded at once after the finish
    except BaseException:
        batch.calls.remove(call)
        raise


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


def started() -> None:
    """Tell every middleware in this process that the app is being served: a journal
    takes over its app's calls from now on, not from the first request. For gunicorn's
    ``post_worker_init``; the FastCGI worker says so itself (``fcgi_startup``)."""
    for middleware in list(_middlewares):
        middleware._serving()


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
    "started",
    "volatile",
]
