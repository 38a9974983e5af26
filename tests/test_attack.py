"""What a hostile or careless user found: each case a defined answer, and the worker
goes on serving (tests/apps_attack.py has the apps)."""

from __future__ import annotations

import logging
import os
import re
import signal
import struct
import threading
import time

import pytest
from flup.server import fcgi_base as flup

from fcgi.ops.scoreboard import Scoreboard
from tests import apps_attack
from tests.fcgi_client import Client, begin, record, request_bytes
from tests.gate import Gate
from tests.procs import connectable, python_env, wait_for, worker


@pytest.mark.parametrize("threads", [1, 4])
def test_an_app_breaking_the_access_log_fields_keeps_the_worker(serve, tmp_path, threads):
    running = serve(
        apps_attack.broken_log_fields, threads=threads, access_log=str(tmp_path / "access.log")
    )
    for _ in range(threads + 2):  # more than there are request threads
        response = running.client().request("/")
        assert (response.status, response.body) == (200, b"ok")


@pytest.mark.parametrize("threads", ["1", "4"])
def test_finish_request_from_another_thread_does_not_hold_the_stop(tmp_path, threads):
    with worker(
        tmp_path,
        "tests.apps_attack:finish_from_thread",
        "--threads",
        threads,
        "--graceful-timeout",
        "100",
    ) as (proc, sock):
        client = Client(str(sock))
        response = client.request("/")
        assert (response.status, response.body) == (200, b"")
        assert client.request("/again").status == 200
        client.close()
        proc.send_signal(signal.SIGTERM)
        # waiting for the app's own thread would hold the stop to its 100 s deadline
        assert proc.wait(30) == 0


@pytest.mark.slow
def test_an_aborted_request_never_answers_the_next_one_on_its_id(serve):
    running = serve(apps_attack.sleepy, threads=4)
    client = running.client()
    client.send(request_bytes("/aborted?0.5"))
    wait_for(lambda: running.server.in_progress, what="the request to run")
    client.send(record(flup.FCGI_ABORT_REQUEST, 1))
    assert client.read_response().end == (1, 0)
    # the web server may reuse id 1 on this connection at once
    response = client.request("/next?1")
    assert (response.status, response.body) == (200, b"/next")


def _worker_log(tmp_path):
    return tmp_path / "app.log"


def test_defer_from_deferred_work_is_refused_and_counted(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    with worker(tmp_path, "tests.apps_attack:deferring", "--status-path", "/status", env=env) as (
        proc,
        sock,
    ):
        client = Client(str(sock))
        assert client.request("/nested").body == b"ok"
        counts = {}

        def both_ended() -> bool:
            text = client.request("/status").body.decode()
            counts.update(re.findall(r"deferred (\w+): +(\d+)", text))
            return counts["done"] == "1" and counts["failed"] == "1"

        wait_for(both_ended, what="the two calls to end")
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert log.read_text() == "after nested\n"  # the refused call never ran, late or not
    assert "already handed over" in _worker_log(tmp_path).read_text()
    assert (counts["queued"], counts["running"], counts["abandoned"]) == ("0", "0", "0")


def test_a_deferred_call_that_forks_and_returns_runs_nothing_twice(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    with worker(tmp_path, "tests.apps_attack:deferring", env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/fork").body == b"ok"
        client.close()
        wait_for(lambda: log.exists() and "after fork" in log.read_text(), what="the calls")
        wait_for(  # the copy that returned into the executor leaves, saying so
            lambda: "returned into the executor" in _worker_log(tmp_path).read_text(),
            what="the forked copy to exit",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert log.read_text().splitlines() == ["parent", "after fork"]
    assert "forked" in _worker_log(tmp_path).read_text()


def test_a_deferred_callable_whose_attributes_raise_still_runs_and_counts(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    with worker(tmp_path, "tests.apps_attack:deferring_proxy", env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/").body == b"ok"
        client.close()
        wait_for(lambda: log.exists() and "after proxy" in log.read_text(), what="the calls")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert log.read_text().splitlines() == ["proxy ran", "after proxy"]
    assert "2 call(s) taken, 2 done, 0 failed, 0 abandoned" in _worker_log(tmp_path).read_text()


def test_a_helper_process_that_dies_is_logged_its_calls_ended_and_replaced(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    app = "tests.apps_attack:deferring_helper"
    with worker(tmp_path, app, "--status-path", "/status", env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/exit").body == b"ok"
        wait_for(lambda: "died (exit 0)" in _worker_log(tmp_path).read_text(), what="the log")
        status = client.request("/status").body.decode()
        assert re.search(r"deferred queued: +0\n", status), status
        assert re.search(r"deferred running: +0\n", status), status
        assert client.request("/later").body == b"ok"
        wait_for(lambda: log.exists() and "after later" in log.read_text(), what="later work")
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    ran_in = int(log.read_text().split("after later in ")[1])
    assert ran_in != proc.pid  # in a new helper, not the worker
    assert "deferred _note_pid(" in _worker_log(tmp_path).read_text().split("died")[1]


@pytest.mark.slow
def test_a_peer_that_floods_without_reading_gets_no_unbounded_memory(serve):
    running = serve(apps_attack.sleepy)
    names = b"".join(flup.encode_pair(name, b"") for name in (b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS"))
    flood = record(flup.FCGI_GET_VALUES, 0, names) * 4096  # each one answered
    peer = running.client()
    peer.sock.setblocking(False)
    pending, sent, most = flood, 0, 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and sent < 64 << 20:
        try:
            n = peer.sock.send(pending)
        except BlockingIOError:  # the worker stopped reading us: that is the point
            time.sleep(0.01)
        else:
            sent += n
            pending = pending[n:] or flood
        most = max([most, *(c.out_size for c in list(running.server.conns.values()))])
    assert most < 4 << 20, f"{most} bytes of answers queued for a peer that reads nothing"
    response = running.client().request("/other")
    assert (response.status, response.body) == (200, b"/other")
    # once the peer reads its answers, the worker reads it again
    got = []
    reader = threading.Thread(target=lambda: got.append(peer.read_response()), daemon=True)
    peer.sock.settimeout(10)
    reader.start()
    peer.send(pending + request_bytes("/after"))
    reader.join(10)
    assert got and got[0].body == b"/after"


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "4"])
def test_a_request_past_the_graceful_deadline_is_named_and_the_stop_exits_3(tmp_path, threads):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    args = ("--threads", threads, "--graceful-timeout", "1")
    with worker(tmp_path, "tests.apps_attack:stuck", *args, env=env) as (proc, sock):
        client = Client(str(sock))
        client.send(request_bytes("/stuck?60"))
        wait_for(lambda: log.exists() and "running" in log.read_text(), what="the request")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 3  # the deadline (1 s) ended it, not the 60 s request
        client.close()
    text = _worker_log(tmp_path).read_text()
    assert "(GET /stuck?60) still running at the graceful deadline; abandoned" in text


@pytest.mark.slow
def test_a_coroutine_that_blocks_the_loop_is_reported_slow(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    args = ("--slow-deferred", "0.3")
    with worker(tmp_path, "tests.apps_attack:deferring", *args, env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/block").body == b"ok"
        wait_for(
            lambda: "slow deferred _block_the_loop()" in _worker_log(tmp_path).read_text(),
            what="the slow line while the loop is blocked",
        )
        assert not log.exists()  # it is still blocking: reported while it ran
        wait_for(lambda: log.exists() and "after block" in log.read_text(), what="the calls")
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_process_forked_while_pool_json_is_locked_does_not_keep_it_locked(tmp_path):
    # The deferred-work helper is forked from the worker at its first call; when the
    # status sampler held pool.json's lock at that moment, the helper kept it for ever
    # and the worker hung at its next sample (seen in 3 of 8 starts).
    board = Scoreboard(tmp_path / "board")
    release_r, release_w = os.pipe()
    try:
        with board._locked_pool():
            child = os.fork()
            if child == 0:  # holds whatever it inherited until the test lets it go
                os.read(release_r, 1)
                os._exit(0)
        done = threading.Event()
        threading.Thread(target=lambda: (board.pool(), done.set()), daemon=True).start()
        assert done.wait(20), "pool.json stayed locked by the forked child"
    finally:
        os.write(release_w, b"x")
        os.waitpid(child, 0)
        os.close(release_r)
        os.close(release_w)
        board.close()


@pytest.mark.parametrize("threads", ["1", "4"])
def test_an_app_child_returning_into_the_worker_exits_and_the_parent_answers(tmp_path, threads):
    with worker(tmp_path, "tests.apps_attack:forking", "--threads", threads) as (proc, sock):
        client = Client(str(sock), timeout=5)
        assert client.request("/").body == b"parent"
        assert client.request("/again").body == b"parent"
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "returned into the worker; the child exits" in _worker_log(tmp_path).read_text()


def test_sighup_reloads_in_place_after_running_the_deferred_work(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    with worker(tmp_path, "tests.apps:many_deferred", env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/?n=1&seconds=0.5").body == b"queued\n"
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: log.exists() and "job0" in log.read_text(),
            30,
            "the deferred work, before the exec",
        )
        wait_for(lambda: "fresh interpreter" in _worker_log(tmp_path).read_text(), 30, "the reload")
        assert client.request("/?n=0").status == 200  # the same connection, the same pid
        client.close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_request_timing_out_during_a_graceful_stop_is_abandoned_by_the_stop(tmp_path, threads):
    """A watchdog tick during a stop: the request past --request-timeout is answered 504,
    the stop goes on (no reload is begun under it), and since its thread still runs in
    the app when the worker exits, the stop says so and exits 3. With --threads 1 that
    thread is the main one: the worker exits all the same, not when the app returns."""
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    args = ("--threads", threads, "--graceful-timeout", "20", "--request-timeout", "2")
    with worker(tmp_path, "tests.apps_attack:stuck", *args, env=env) as (proc, sock):
        client = Client(str(sock))
        client.send(request_bytes("/stuck?60"))
        wait_for(lambda: log.exists() and "running" in log.read_text(), what="the request")
        proc.send_signal(signal.SIGTERM)
        assert client.read_response().status == 504
        assert proc.wait(30) == 3  # at once after the timeout, not at the 20 s deadline
        client.close()
    text = _worker_log(tmp_path).read_text()
    assert "the stop goes on without it" in text
    assert "(GET /stuck?60) timed out (--request-timeout) and still runs in the app" in text
    assert "reloading" not in text and "reloads in place" not in text


def test_the_access_log_reopens_where_it_was_after_the_app_changes_folder(tmp_path):
    """A relative --access-log was reopened (SIGUSR1, after a rotation) relative to the
    folder of the moment: once the app had called os.chdir(), the lines went elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ("--access-log", "access.log")
    with worker(tmp_path, "tests.apps_attack:moving", *args, cwd=tmp_path) as (proc, sock):
        client = Client(str(sock))
        assert client.request(f"/cd?{elsewhere}").body == b"ok"
        # the line is written once the response is out, so after the client has it
        wait_for(lambda: "/cd?" in (tmp_path / "access.log").read_text(), what="the /cd line")
        (tmp_path / "access.log").rename(tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        wait_for(
            lambda: client.request("/after").status == 200 and (tmp_path / "access.log").exists(),
            what="the reopened log",
        )
        client.close()
    assert "/cd?" in (tmp_path / "access.log.1").read_text()
    assert "GET /after" in (tmp_path / "access.log").read_text()
    assert not (elsewhere / "access.log").exists()


def test_a_connection_beginning_more_requests_than_fcgi_max_reqs_gets_overloaded(serve):
    """Each request may send --max-params of params, but a connection could begin any
    number of them at once (2000 half-sent ones held 600 MB). Beyond FCGI_MAX_REQS (what
    the worker answers FCGI_GET_VALUES with) a request is refused with OVERLOADED."""
    running = serve(apps_attack.sleepy, threads=1, max_detached=2)
    most = int(running.server.fcgi_values["FCGI_MAX_REQS"])
    assert most == 3
    client = running.client()
    half = flup.encode_pair(b"HTTP_X", b"a" * 1000)
    for rid in range(1, most + 3):
        client.send(begin(rid) + record(flup.FCGI_PARAMS, rid, half))
    refused = [client.read_record() for _ in range(2)]
    end_body = struct.pack(flup.FCGI_EndRequestBody, 0, flup.FCGI_OVERLOADED)
    assert refused == [(flup.FCGI_END_REQUEST, rid, end_body) for rid in (most + 1, most + 2)]
    # the requests taken are served on the same connection
    client.send(request_bytes("/first")[len(begin(1)) :])
    response = client.read_response()
    assert (response.status, response.body) == (200, b"/first")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_list_response_the_peer_breaks_off_before_it_went_out_is_logged_as_aborted(
    serve, tmp_path, caplog, threads
):
    """The whole body is queued at the finish, then the web server's connection goes:
    499 and the bytes that did go out, and the abort's info line. The app had produced
    all of it, so for its deferred calls it counts as served (docs/deployment.md)."""
    from wsgi_app.deferred import DeferredMiddleware, defer, defer_always

    size = 16 << 20  # far past the socket's buffer and the channel's high-water mark
    ran: list[str] = []

    def inner(environ, start_response):
        defer(environ, ran.append, "deferred")
        defer_always(environ, ran.append, "always")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"y" * size]

    access = tmp_path / "access.log"
    running = serve(DeferredMiddleware(inner), threads=threads, access_log=str(access))
    client = running.client()
    with caplog.at_level(logging.INFO):
        client.send(request_bytes("/big"))
        assert client.read_record()[0] == flup.FCGI_STDOUT  # a list: all of it was queued
        client.close()
        wait_for(lambda: access.exists() and access.read_text(), what="the access-log line")
        wait_for(lambda: len(ran) == 2, what="the deferred calls")
    (line,) = [line for line in access.read_text().splitlines() if "/big" in line]
    status, sent = re.search(r'" (\d+) (\d+) ', line).groups()
    assert status == "499" and 0 <= int(sent) < size, line
    assert ran == ["deferred", "always"]
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "gave up on it (the visitor left)" in m], messages
    assert running.client().request("/").status == 200  # the worker serves on


GATED_IMPORT_APP = """
import os
from pathlib import Path

from tests.gate import wait_at

Path(os.environ["IMPORTING"]).touch()
wait_at(os.environ["IMPORT_GATE"])  # the import waits here until the test opens the gate


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"served"]
"""


def test_signals_while_the_app_imports_do_not_end_the_worker(tmp_path):
    """A cold start: SIGALRM and SIGUSR1 (whose default actions end a process) and
    SIGHUP (a reload racing the start) arrive while the app imports. The worker serves;
    the alarm gets its one warning, the HUP becomes a reload once serving."""
    (tmp_path / "gated.py").write_text(GATED_IMPORT_APP)
    importing = tmp_path / "importing"
    env = python_env(IMPORTING=str(importing), IMPORT_GATE=str(tmp_path / "gate"))
    log = tmp_path / "app.log"
    with (
        Gate(tmp_path / "gate") as gate,
        worker(
            tmp_path, "gated:app", "--pythonpath", str(tmp_path), env=env, until=connectable
        ) as (proc, sock),
    ):
        wait_for(importing.exists, what="the app's import to begin")
        for sig in (signal.SIGALRM, signal.SIGUSR1, signal.SIGHUP):
            proc.send_signal(sig)
        gate.open()
        wait_for(
            lambda: proc.poll() is not None or log.read_text().count("serving on") == 2,
            30,
            "the worker to serve, then reload",
        )
        assert proc.poll() is None, f"the worker ended ({proc.returncode}): {log.read_text()}"
        client = Client(str(sock))
        assert client.request("/").body == b"served"
        client.close()
    text = log.read_text()
    assert "SIGHUP while starting" in text and text.count("SIGALRM ignored") == 1, text
