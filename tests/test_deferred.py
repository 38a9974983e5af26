"""The deferred-work middleware, under our server and called as any server would."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from tests.inprocess import call_app
from tests.procs import wait_for
from wsgi_app.deferred import DeferredMiddleware, defer, drain, finish_request


def test_runs_in_registration_order_after_the_response(serve):
    events: list[str] = []
    done = threading.Event()

    def inner(environ, start_response):
        for i in range(5):
            defer(environ, events.append, f"call {i}")
        defer(environ, done.set)
        start_response("200 OK", [])
        events.append("responded")
        return [b"ok"]

    resp = serve(DeferredMiddleware(inner)).client().request("/")
    assert resp.body == b"ok"
    assert done.wait(5)
    assert events == ["responded"] + [f"call {i}" for i in range(5)]


def test_a_failure_is_logged_with_the_request_and_the_rest_still_run(caplog):
    ran = threading.Event()

    def broken(x):
        raise ValueError(f"bad {x}")

    def inner(environ, start_response):
        defer(environ, broken, 7)
        defer(environ, ran.set)
        start_response("200 OK", [])
        return [b"ok"]

    app = DeferredMiddleware(inner)
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        call_app(app, "/signup")
        assert ran.wait(5)
    assert "broken(7) failed (request GET /signup)" in caplog.text
    assert "ValueError: bad 7" in caplog.text
    wait_for(lambda: app.stats()["done"] == 1, what="the second call to be counted")
    assert app.stats()["failed"] == 1


def test_coroutines_interleave_on_one_loop():
    arrived: list[str] = []
    finished: list[str] = []
    everyone = asyncio.Event()

    async def wait_for_the_others(i):
        arrived.append(i)
        if len(arrived) == 50:
            everyone.set()
        await everyone.wait()  # one at a time, the first would wait for ever
        finished.append(i)

    def inner(environ, start_response):
        defer(environ, wait_for_the_others, environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    app = DeferredMiddleware(inner, threads=1)
    for i in range(50):
        call_app(app, str(i))
    assert drain(30) == 0
    assert sorted(finished, key=int) == [str(i) for i in range(50)]


def test_returns_at_once_under_a_server_without_finish():
    release = threading.Event()
    done = threading.Event()

    def inner(environ, start_response):
        defer(environ, lambda: (release.wait(5), done.set()))
        start_response("200 OK", [])
        return iter([b"a", b"b"])

    status, body = call_app(DeferredMiddleware(inner))
    assert (status, body) == ("200 OK", b"ab")
    assert not done.is_set()  # the response is complete before the work runs
    release.set()
    assert done.wait(5)


def test_full_backlog_queues_beyond_it_never_on_the_request_thread(caplog):
    gate = threading.Event()
    ran: list[str] = []
    threads: set[str] = set()

    def note(path):
        threads.add(threading.current_thread().name)
        ran.append(path)

    def inner(environ, start_response):
        defer(environ, gate.wait, 5)
        defer(environ, note, environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    app = DeferredMiddleware(inner, threads=1, backlog=2)
    with caplog.at_level(logging.WARNING, "wsgi_app.deferred"):
        call_app(app, "first")  # queued: 2 calls, the backlog
        call_app(app, "second")  # backlog full: queued beyond it, the caller goes on
        assert ran == []  # nothing ran on this thread
        gate.set()
        assert drain(5) == 0
    assert "backlog of 2 full" in caplog.text
    assert sorted(ran) == ["first", "second"]
    assert threading.current_thread().name not in threads
    assert app.stats()["overflowed"] == 2


def test_drain_logs_what_it_abandons(caplog):
    def inner(environ, start_response):
        defer(environ, time.sleep, 2)
        defer(environ, print, "never")
        start_response("200 OK", [])
        return [b""]

    app = DeferredMiddleware(inner)
    call_app(app, "/slow")
    wait_for(lambda: app.stats()["running"] == 1, what="the first call to start")
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        abandoned = app.executor.drain(0.2)
    assert abandoned == 2
    assert "sleep(2) abandoned at stop, still running (request GET /slow)" in caplog.text
    assert "print('never') abandoned at stop, never started" in caplog.text


def test_defer_without_the_middleware_says_how_to_fix():
    with pytest.raises(RuntimeError, match="DeferredMiddleware"):
        defer({}, print)


def test_finish_request_is_false_where_the_server_cannot_finish():
    assert finish_request({}) is False


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("DEFERRED_BACKLOG", "lots")
    with pytest.raises(ValueError, match="DEFERRED_BACKLOG"):
        DeferredMiddleware(lambda e, s: [])


def test_nested_middlewares_with_list_results_each_run_their_calls():
    ran = []

    def inner_app(environ, start_response):
        defer(environ, ran.append, "inner")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    inner = DeferredMiddleware(inner_app)

    def outer_app(environ, start_response):
        defer(environ, ran.append, "outer")
        return inner(environ, start_response)

    outer = DeferredMiddleware(outer_app)
    result = outer({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None)
    assert list(result) == [b"ok"]
    result.close()
    wait_for(lambda: sorted(ran) == ["inner", "outer"], what="both middlewares' calls")
