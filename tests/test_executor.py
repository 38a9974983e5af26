"""The deferred executor in process: nothing kills it, every call ends once, a drained
executor reopens, failed requests skip their calls."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

from tests.inprocess import call_app
from tests.procs import ROOT, python_env, wait_for
from wsgi_app.deferred import DeferredMiddleware, defer, defer_always
from wsgi_app.runtime.calls import Batch, Call
from wsgi_app.runtime.executor import DeferredExecutor
from wsgi_app.runtime.threads import ElasticPool


async def exits_async():
    raise SystemExit(4)


def interrupts():
    raise KeyboardInterrupt


def generator_exits():
    raise GeneratorExit


@pytest.mark.parametrize(
    "killer", [sys.exit, interrupts, generator_exits, exits_async], ids=lambda f: f.__name__
)
def test_a_base_exception_is_logged_and_the_ten_calls_after_it_run(caplog, killer):
    ran: list[int] = []

    async def note_async(i):
        ran.append(i)

    def inner(environ, start_response):
        defer(environ, killer)
        for i in range(10):  # plain and coroutine calls alternate: both paths go on
            defer(environ, ran.append if i % 2 else note_async, i)
        start_response("200 OK", [])
        return [b"ok"]

    app = DeferredMiddleware(inner)
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        call_app(app, "/first")
        wait_for(lambda: len(ran) == 10, what="the ten calls after it")
        call_app(app, "/second")  # the executor still takes work
        wait_for(lambda: len(ran) == 20, what="the next request's calls")
    assert ran == list(range(10)) * 2
    assert f"deferred {killer.__qualname__}() failed (request GET /first)" in caplog.text
    stats = app.stats()
    assert (stats["failed"], stats["done"], stats["running"], stats["queued"]) == (2, 20, 0, 0)


async def interrupts_async():
    raise KeyboardInterrupt


@pytest.mark.parametrize("killer", [exits_async, interrupts_async], ids=lambda f: f.__name__)
def test_a_base_exception_under_a_timeout_fails_the_call_once_and_keeps_the_loop(caplog, killer):
    """Under a timeout (asyncio.wait_for) the coroutine ran in a task of its own, and
    asyncio re-raised its SystemExit out of the loop: the loop was logged as failed and
    run again, besides the call's own failure."""
    ran: list[str] = []

    async def after():
        ran.append("after")

    def inner(environ, start_response):
        defer(environ, killer)
        defer(environ, after)
        start_response("200 OK", [])
        return [b"ok"]

    app = DeferredMiddleware(inner, timeout=5)
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        call_app(app)
        wait_for(lambda: ran, what="the call after it")
        call_app(app)
        wait_for(lambda: len(ran) == 2, what="the next request's calls")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"deferred {killer.__qualname__}() failed (request GET /)"
    ] * 2
    stats = app.stats()
    assert (stats["failed"], stats["done"], stats["running"]) == (2, 2, 0)


def test_a_pool_thread_that_dies_anyway_is_replaced(caplog):
    ran: list[str] = []

    def run(item):
        if item == "die":
            raise SystemExit  # escapes run(): kills the thread
        ran.append(item)

    pool = ElasticPool(run, max_threads=1, idle_timeout=5)
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        pool.submit("die")
        pool.submit("after")
        wait_for(lambda: ran == ["after"], what="the item after the death")
    pool.close()
    assert "deferred pool thread deferred died; starting a new one" in caplog.text


def test_the_pool_grows_while_calls_block_and_shrinks_when_idle():
    gate = threading.Event()
    pool = ElasticPool(lambda item: gate.wait(5), max_threads=5, idle_timeout=0.2)
    for _ in range(8):
        pool.submit(None)
    # past max_threads, work waits its turn
    wait_for(lambda: pool.threads == 5 and pool.waiting == 3, what="five threads, three waiting")
    gate.set()
    wait_for(lambda: pool.threads == 0, what="the idle threads to end")


def test_queued_means_waiting_and_running_means_running():
    gate = threading.Event()

    def inner(environ, start_response):
        defer(environ, gate.wait, 5)
        defer(environ, gate.wait, 5)
        start_response("200 OK", [])
        return [b""]

    app = DeferredMiddleware(inner, threads=2)
    for _ in range(3):
        call_app(app)
    wait_for(lambda: app.stats()["running"] == 2, what="two calls to run")
    stats = app.stats()
    assert (stats["queued"], stats["running"], stats["registered"]) == (4, 2, 6)
    gate.set()
    wait_for(lambda: app.stats()["done"] == 6, what="all six to end")
    assert app.stats()["queued"] == app.stats()["running"] == 0


def test_drain_counts_every_call_once_even_those_ending_after_it(caplog):
    release = threading.Event()

    def hold():
        release.wait(30)

    def inner(environ, start_response):
        defer(environ, hold)
        defer(environ, print, "never")
        start_response("200 OK", [])
        return [b""]

    app = DeferredMiddleware(inner, threads=1)
    for i in range(3):
        call_app(app, f"/{i}")
    wait_for(lambda: app.stats()["running"] == 1, what="the first call to start")
    with caplog.at_level(logging.INFO, "wsgi_app.deferred"):
        assert app.executor.drain(0.1) == 6
        release.set()  # the running call ends after its abandonment: counted once
        wait_for(lambda: "hold() ended after the stop had abandoned it" in caplog.text)
    stats = app.stats()
    assert stats["done"] + stats["failed"] + stats["abandoned"] == stats["registered"] == 6
    assert stats["running"] == stats["queued"] == 0
    assert "hold() abandoned at stop, still running (request GET /0)" in caplog.text
    assert "print('never') abandoned at stop, never started (request GET /2)" in caplog.text
    assert "6 call(s) taken, 0 done, 0 failed, 6 abandoned" in caplog.text


def test_a_drained_executor_reopens():
    executor = DeferredExecutor()
    for round_ in range(3):
        done = threading.Event()
        executor.submit(Batch("GET /", calls=[Call(done.set)]))
        assert done.wait(5), f"round {round_}"
        assert executor.drain(5) == 0
    assert executor.snapshot()["done"] == 3


def test_the_access_line_counts_abandoned_calls_as_failures():
    reports = []
    executor = DeferredExecutor(threads=1)
    batch = Batch("GET /", calls=[Call(time.sleep, (0.3,)), Call(print, ("x",))])
    batch.on_done = lambda *args: reports.append(args)
    executor.submit(batch)
    wait_for(lambda: executor.snapshot()["running"], what="the call to start")
    assert executor.drain(0) == 2
    assert [(count, failed) for count, _, failed in reports] == [(2, 2)]


def failing_app(how):
    """An app that fails in one of the ways a request can fail."""

    def inner(environ, start_response):
        defer(environ, environ["ran"].append, "defer")
        defer_always(environ, environ["ran"].append, "always")
        if how == "raises":
            raise ValueError("app bug")
        if how == "500":
            start_response("500 Internal Server Error", [])
            return [b"oops"]
        start_response("200 OK", [])

        def body():
            yield b"part"
            raise ValueError("body bug")

        return body()

    return inner


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("raises", "the app raised ValueError"),
        ("500", "500 Internal Server Error"),
        ("cut", "the body raised ValueError"),
    ],
)
@pytest.mark.parametrize("run_on_error", [False, True])
def test_a_failed_request_skips_its_calls_unless_told(caplog, how, reason, run_on_error):
    ran: list[str] = []
    app = DeferredMiddleware(failing_app(how), run_on_error=run_on_error)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/x", "QUERY_STRING": "", "ran": ran}
    with caplog.at_level(logging.WARNING, "wsgi_app.deferred"):
        try:
            result = app(environ, lambda s, h, e=None: None)
            try:
                list(result)
            finally:
                result.close()
        except ValueError:
            pass
        assert app.executor.drain(5) == 0
    if run_on_error:
        assert sorted(ran) == ["always", "defer"]
        assert f"(request POST /x) failed ({reason}): running its 2 deferred" in caplog.text
    else:
        assert ran == ["always"]
        assert app.stats()["skipped"] == 1
        assert f"(request POST /x) failed ({reason}): skipping its deferred " in caplog.text
        assert "running 1 registered with defer_always" in caplog.text


def test_a_body_the_server_stops_reading_counts_as_failed():
    ran: list[str] = []

    def inner(environ, start_response):
        defer(environ, ran.append, "x")
        start_response("200 OK", [])
        return iter([b"a", b"b"])

    app = DeferredMiddleware(inner)
    result = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, e=None: None)
    next(iter(result))
    result.close()  # the client went away after the first chunk
    assert app.executor.drain(5) == 0
    assert ran == [] and app.stats()["skipped"] == 1


def test_the_stats_hook_is_offered_only_when_the_server_has_it():
    hooks = []
    app = DeferredMiddleware(lambda e, s: (s("200 OK", []), [b""])[1])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "fcgi.add_drain_hook": hooks.append}
    app(environ, lambda s, h, e=None: None).close()  # no KeyError for fcgi.add_stats_hook
    assert hooks == [app.executor.drain]


def test_importing_the_package_does_not_build_the_demo():
    env = python_env(DEFERRED_BACKLOG="lots")
    ok = subprocess.run(
        [sys.executable, "-c", "from wsgi_app.deferred import defer"], cwd=ROOT, env=env
    )
    assert ok.returncode == 0
    demo = subprocess.run(
        [sys.executable, "-c", "import wsgi_app.demo; wsgi_app.demo.application"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "backlog (DEFERRED_BACKLOG) = 'lots'" in demo.stderr


def test_a_plain_function_returning_an_awaitable_has_it_awaited():
    ran: list[str] = []

    async def later():
        await asyncio.sleep(0.01)
        ran.append("awaited")

    def inner(environ, start_response):
        defer(environ, lambda: later())  # plain: returns a coroutine, awaited on the loop
        defer(environ, lambda: ran.append("next"))
        start_response("200 OK", [])
        return [b""]

    app = DeferredMiddleware(inner)
    call_app(app)
    assert app.executor.drain(5) == 0
    assert ran == ["awaited", "next"]


def test_a_forked_child_neither_runs_nor_counts_the_parents_work(tmp_path):
    gate = threading.Event()
    executor = DeferredExecutor(threads=1)
    executor.submit(Batch("GET /parent", calls=[Call(gate.wait, (5,))]))
    wait_for(lambda: executor.snapshot()["running"] == 1, what="the parent's call")
    with warnings.catch_warnings():  # 3.12+ warns of fork() beside threads: that is the case
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its own work runs, the parent's is not waited for
        done = threading.Event()
        executor.submit(Batch("GET /child", calls=[Call(done.set)]))
        ok = done.wait(5) and executor.drain(1) == 0 and executor.snapshot()["done"] == 1
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    gate.set()
    assert os.waitstatus_to_exitcode(status) == 0
    assert executor.drain(5) == 0
