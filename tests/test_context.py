"""Deferred work runs in the context of its defer(): what the request bound in context
variables is seen by plain and coroutine calls, in memory and with the journal, and
nothing a call sets reaches the next call on its thread."""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import threading

import pytest

from fcgi.ops.logs import JSONFormatter
from tests import apps_context
from tests.inprocess import call_app
from tests.procs import wait_for
from wsgi_app.deferred import DeferredMiddleware, defer


@pytest.fixture
def seen():
    apps_context.seen.clear()
    return apps_context.seen


def stopped(middleware) -> None:
    """The drain hooks a server calls at a stop, in their order."""
    if middleware.backend is not None:
        middleware.backend.stop()
    assert middleware.executor.drain(10) == 0
    if middleware.backend is not None:
        middleware.backend.flush()


@pytest.mark.parametrize("where", ["memory", "journal"])
def test_each_call_sees_its_own_requests_value_and_changes_only_its_copy(seen, tmp_path, where):
    settings = {"threads": 1}  # one pool thread runs every plain call, one after another
    if where == "journal":
        settings["journal"] = str(tmp_path / "journal.sqlite3")
    app = apps_context.make(**settings)
    try:
        calls = "record_and_change,record,arecord_and_change,arecord"
        call_app(app.tagged, "/", f"tag=a&calls={calls}")
        call_app(app.tagged, "/", "tag=b&calls=record,arecord")
        call_app(app.tagged, "/", "calls=record,arecord")  # a request that bound nothing
        wait_for(lambda: len(seen) == 8, what="the eight calls")
    finally:
        stopped(app)
    assert {name: tag for name, tag, _ in seen} == {
        "a/record_and_change": "a",
        "a/record": "a",  # the change before it stayed in that call's own copy
        "a/arecord_and_change": "a",
        "a/arecord": "a",
        "b/record": "b",
        "b/arecord": "b",
        "-/record": "<none>",  # not a value left on the thread by an earlier call
        "-/arecord": "<none>",
    }
    plain = {thread for name, _, thread in seen if name.endswith("/record")}
    assert len(plain) == 1  # the same thread ran the changing call and the later ones


def test_add_task_and_defer_always_carry_the_context_and_no_request_is_current(seen):
    app = apps_context.make()
    try:
        call_app(app.tagged, "/", "tag=t&how=add_task&calls=record,arecord,outside_a_request")
        call_app(app.tagged, "/", "tag=f&how=defer_always&fail=1&calls=record")  # a 500
        wait_for(lambda: len(seen) == 4, what="the four calls")
    finally:
        stopped(app)
    assert {name: tag for name, tag, _ in seen} == {
        "t/record": "t",
        "t/arecord": "t",
        # add_task() inside deferred work: after the app call, so no request is current
        "t/outside_a_request": "outside, current_environ None",
        "f/record": "f",  # defer_always: the request failed, the call ran, in its context
    }


# -- the lines about a deferred call carry what the request bound ---------------------------


def send_welcome(address: str) -> None:
    """A deferred call that logs its own line, then fails (the middleware logs that)."""
    logging.getLogger("tests.shop").warning("sending the welcome mail to %s", address)
    raise ConnectionError("smtp down")


@contextlib.contextmanager
def handler_on(*names: str, formatter: logging.Formatter, filter_=None):
    """A handler writing to a string, on the loggers ``names`` (their levels at INFO)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    if filter_ is not None:
        handler.addFilter(filter_)
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_contextvars_reach_the_calls_own_lines_and_the_middlewares(serve):
    import structlog

    shared = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )

    def mail(address: str) -> None:
        structlog.get_logger("tests.shop").info("mail queued", to=address)
        send_welcome(address)

    def signup(environ, start_response):
        structlog.contextvars.clear_contextvars()  # the recipe: a request starts clean
        structlog.contextvars.bind_contextvars(user="ada", path=environ["PATH_INFO"])
        defer(environ, mail, "ada@example.org")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["fcgi.request_id"].encode()]

    app = DeferredMiddleware(signup)
    try:
        with handler_on("tests.shop", "wsgi_app.deferred", formatter=formatter) as stream:
            request_id = serve(app).client().request("/signup").body.decode()
            wait_for(lambda: len(json_lines(stream)) == 3, what="the three lines")
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        stopped(app)
    own, stdlib_own, failure = json_lines(stream)
    assert own["event"] == "mail queued" and own["to"] == "ada@example.org"
    assert stdlib_own["event"] == "sending the welcome mail to ada@example.org"
    assert "mail('ada@example.org') failed (request GET /signup)" in failure["event"]
    for line in (own, stdlib_own, failure):
        assert (line["user"], line["path"]) == ("ada", "/signup")
    assert failure["request_id"] == request_id  # the middleware's extra= field


user = contextvars.ContextVar("user", default="-")


class ContextFields(logging.Filter):
    """The stdlib recipe: copy context variables onto every record the handler sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.user = user.get()
        return True


def test_a_logging_filter_sees_the_request_on_failure_and_abandonment_lines(serve):
    release = threading.Event()

    def signup(environ, start_response):
        token = user.set("ada")
        try:
            defer(environ, send_welcome, "ada@example.org")
            defer(environ, release.wait, 10)  # still running at the stop
            defer(environ, print, "never")  # never started
        finally:
            user.reset(token)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["fcgi.request_id"].encode()]

    app = DeferredMiddleware(signup, threads=1)
    formatter = JSONFormatter()  # the worker's --log-format json: every field given
    try:
        with handler_on(
            "tests.shop", "wsgi_app.deferred", formatter=formatter, filter_=ContextFields()
        ) as stream:
            request_id = serve(app).client().request("/signup").body.decode()
            stats = app.stats
            wait_for(lambda: stats()["failed"] == stats()["running"] == 1, what="the wait")
            assert app.executor.drain(0.1) == 2
    finally:
        release.set()
    own, failure, running, never, summary = json_lines(stream)
    assert own["message"] == "sending the welcome mail to ada@example.org"
    assert "send_welcome('ada@example.org') failed (request GET /signup)" in failure["message"]
    assert "abandoned at stop, still running" in running["message"]
    assert "print('never') abandoned at stop, never started" in never["message"]
    for line in (own, failure, running, never):
        assert line["user"] == "ada"
    for line in (failure, running, never):
        assert line["request_id"] == request_id
    assert summary["user"] == "-"  # the stop's totals: about no call, in no request's context
