"""Stopping, recycling, timeouts, hostile input and peers that leave."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import signal
import socket
import struct
import threading
import time

import pytest
from flup.server import fcgi_base as flup

from tests import apps
from tests.fcgi_client import Client, begin, params, record, request_bytes
from tests.procs import HTTP, python_env, stack, stop, wait_for, worker, worker_exits
from tests.test_e2e_nginx import done_lines
from wsgi_app.deferred import DeferredMiddleware, defer


@pytest.mark.slow
def test_sigterm_runs_every_accepted_deferred_call_then_exits_0(tmp_path):
    log = tmp_path / "work.log"
    with worker(tmp_path, "tests.apps:many_deferred", env=python_env(TEST_APP_LOG=str(log))) as (
        proc,
        sock,
    ):
        client = Client(str(sock))
        for i in range(12):  # twelve requests, so the calls run side by side
            assert client.request(f"/?n=1&seconds=1.5&i={i}").body == b"queued\n"
        client.close()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        took = time.monotonic() - started
    assert [tag for _, tag, _ in done_lines(log)] == ["job0"] * 12
    assert took >= 1.4  # it waited for the 1.5 s calls


@pytest.mark.slow
def test_sigterm_past_the_deadline_names_what_it_abandons(tmp_path):
    with worker(tmp_path, "tests.apps:many_deferred", "--graceful-timeout", "1") as (proc, sock):
        client = Client(str(sock))
        client.request("/?n=6&seconds=3")
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 3
    text = (tmp_path / "app.log").read_text()
    assert text.count("abandoned at stop") == 6
    assert "slow_sleep(3.0, 'job5') abandoned at stop, never started (request GET /?n=6" in text


def logged_at(text: str, words: str) -> float:
    """The time on the worker's log line holding ``words``, in seconds."""
    line = next(ln for ln in text.splitlines() if words in ln)
    return datetime.datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


@pytest.mark.parametrize(
    ("graceful", "read", "limit"),
    [(2.0, 60.0, "the deadline"), (10.0, 2.0, "--read-timeout")],
    ids=["deadline-first", "read-timeout-first"],
)
@pytest.mark.slow
def test_sigterm_with_a_request_half_sent_names_it_once_and_ends_by_the_deadline(
    tmp_path, graceful, read, limit
):
    log = tmp_path / "app.log"
    args = ("--graceful-timeout", str(graceful), "--read-timeout", str(read))
    with worker(tmp_path, "tests.apps:echo", *args) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/").status == 200  # accepted and read: the stop sees it
        # BEGIN_REQUEST and part of PARAMS (not the empty record that ends them), then nothing
        client.send(begin(1) + params(1, {"REQUEST_METHOD": "POST"})[:-8])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        client.close()
    text = log.read_text()
    told = re.findall(
        r"WARNING fcgi: connection \d+: a request is half-sent; the stop waits for the rest "
        r"of it up to ([\d.]+) s more \((.+?)\)",
        text,
    )
    assert len(told) == 1, text
    assert told[0][1] == limit and float(told[0][0]) <= min(graceful, read), text
    took = logged_at(text, "stopped after") - logged_at(text, "stopping: finishing")
    # the read timeout is checked once a second (fcgi.io.loop.SWEEP_INTERVAL)
    assert took <= min(graceful, read + 1.0) + 0.25, text


def test_stray_sigalrm_is_logged_once_and_the_worker_serves_on(tmp_path):
    log = tmp_path / "app.log"
    with worker(tmp_path, "tests.apps:hello") as (proc, sock):
        wait_for(lambda: "serving on" in log.read_text(), what="the handlers installed")
        proc.send_signal(signal.SIGALRM)
        wait_for(
            lambda: proc.poll() is not None or "SIGALRM ignored" in log.read_text(),
            what="the SIGALRM warning",
        )
        assert proc.poll() is None, f"SIGALRM ended the worker ({proc.returncode})"
        proc.send_signal(signal.SIGALRM)
        client = Client(str(sock))
        assert client.request("/").body == b"Hello world\n"
        client.close()
        proc.send_signal(signal.SIGTERM)  # handled after the SIGALRM sent before it
        assert proc.wait(30) == 0
    assert log.read_text().count("SIGALRM ignored") == 1


def test_the_apps_own_sigalrm_handler_is_kept(tmp_path):
    notes = tmp_path / "notes.log"
    env = python_env(TEST_APP_LOG=str(notes))
    with worker(tmp_path, "tests.apps_alarm:app", env=env) as (proc, _sock):
        wait_for(lambda: "serving on" in (tmp_path / "app.log").read_text(), what="serving")
        proc.send_signal(signal.SIGALRM)
        wait_for(lambda: notes.exists() and "alarm " in notes.read_text(), what="the app's handler")
        assert stop(proc) == 0
    assert "SIGALRM" not in (tmp_path / "app.log").read_text()


def test_sigquit_stops_at_once(tmp_path):
    with worker(tmp_path, "tests.apps:many_deferred") as (proc, sock):
        client = Client(str(sock))
        client.request("/?n=4&seconds=10")
        client.close()
        started = time.monotonic()
        assert stop(proc, signal.SIGQUIT) == 1
        assert time.monotonic() - started < 5
    assert not sock.exists()


HOSTILE = {
    "bad version": b"\x09" + bytes(15),
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "params before begin": params(1, {"A": "b"}),
    "stdin before begin": record(flup.FCGI_STDIN, 1, b"body"),
    "broken pair lengths": begin(1)
    + record(flup.FCGI_PARAMS, 1, b"\x7f\x7fab")
    + record(flup.FCGI_PARAMS, 1),
    "huge pair length": begin(1)
    + record(flup.FCGI_PARAMS, 1, b"\xff\xff\xff\xff\x01ab")
    + record(flup.FCGI_PARAMS, 1),
    "stdin past content length": begin(1)
    + params(1, {"CONTENT_LENGTH": "3"})
    + record(flup.FCGI_STDIN, 1, b"abcdef")
    + record(flup.FCGI_STDIN, 1),
    "params over the limit": begin(1)
    + b"".join(record(flup.FCGI_PARAMS, 1, b"\x01\x7f" + b"x" * 128) for _ in range(200)),
    "short begin body": record(flup.FCGI_BEGIN_REQUEST, 1, b"\x00"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_closes_that_connection_with_one_log_line(serve, caplog, name):
    running = serve(apps.echo, max_params=16384)
    bad = running.client()
    with caplog.at_level(logging.WARNING, "fcgi"):
        bad.send(HOSTILE[name])
        bad.sock.settimeout(5)
        assert bad.read_record() is None  # closed by the worker
    warnings = [r for r in caplog.records if r.name == "fcgi" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "closing it" in warnings[0].getMessage()
    assert running.client().request("/after", method="POST", body=b"ok").body == b"ok"


def test_request_id_zero_and_non_utf8_bytes(serve, caplog):
    running = serve(apps.echo)
    client = running.client()
    with caplog.at_level(logging.WARNING, "fcgi"):
        client.send(begin(rid=0))
        rtype, _rid, content = client.read_record()
    assert rtype == flup.FCGI_UNKNOWN_TYPE and content[0] == flup.FCGI_BEGIN_REQUEST
    assert "request id 0" in caplog.text
    raw_path = "/caf\xe9/\xff\xfe"  # bytes that are not UTF-8, as latin-1 text
    resp = client.request("/x", extra={"PATH_INFO": raw_path, "HTTP_X": "\x80\x81"})
    assert resp.status == 200
    assert (
        resp.head.split(b"X-Path-Info: ")[1].split(b"\r\n")[0]
        == b"[" + raw_path.encode("latin-1") + b"]"
    )


@pytest.mark.slow
def test_half_sent_records_time_out(serve, caplog):
    running = serve(apps.echo, read_timeout=1)
    truncated = running.client()
    truncated.send(begin(1)[:5])  # a header cut short
    beyond = running.client()
    beyond.send(struct.pack("!BBHHBx", 1, flup.FCGI_PARAMS, 1, 1000, 0) + b"only this")
    unfinished = running.client()
    unfinished.send(begin(1) + params(1, {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "10"}))
    with caplog.at_level(logging.WARNING, "fcgi"):
        for client in (truncated, beyond, unfinished):
            client.sock.settimeout(10)
            started = time.monotonic()
            assert client.read_record() is None
            assert time.monotonic() - started < 5
    assert caplog.text.count("half-sent for over 1 s") == 3


def test_idle_and_half_sent_connections_do_not_starve_requests(serve):
    running = serve(apps.echo, read_timeout=60)
    held = []
    for i in range(40):
        client = running.client()
        if i % 2:
            client.send(begin(1) + params(1, {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "5"}))
        held.append(client)
    started = time.monotonic()
    assert running.client().request("/", method="POST", body=b"hello").body == b"hello"
    assert time.monotonic() - started < 1


def test_beyond_max_connections_new_ones_wait_in_the_backlog(serve):
    """At --max-connections with none to spare (a record half-sent on each), a new one
    waits in the listen backlog until one closes; connections never used are evicted,
    least recently used first, once their first-request grace has passed."""
    running = serve(apps.hello, max_connections=3)
    busy = [running.client() for _ in range(3)]
    for client in busy:
        client.send(request_bytes("/")[:5])
    conns = running.server.conns

    def half_sent() -> bool:
        return len(conns) == 3 and all(c.receiving_since for c in list(conns.values()))

    wait_for(half_sent, what="three connections, each half-sent")
    waiting = running.client()
    waiting.send(request_bytes("/"))
    waiting.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        waiting.read_record()
    busy[0].close()
    waiting.sock.settimeout(5)
    assert waiting.read_response().status == 200

    running = serve(apps.hello, max_connections=3)
    unused = [running.client() for _ in range(3)]
    wait_for(lambda: len(running.server.conns) == 3, what="three accepted connections")
    assert running.client().request("/").status == 200  # once the oldest one's grace ends
    assert unused[0].read_record() is None  # the least recently used, closed for it


@pytest.mark.slow
def test_visitor_leaving_mid_response_cuts_the_body_so_only_defer_always_runs(
    serve, tmp_path, monkeypatch, caplog
):
    """The stream stops at the reset: a body cut short is a failed request, whose plain
    deferred calls are skipped (logged) while those of defer_always run."""
    monkeypatch.setattr(apps, "LOG", str(tmp_path / "log"))
    running = serve(apps.streamer)
    client = running.client()
    client.send(request_bytes("/"))
    assert client.read_record()[0] == flup.FCGI_STDOUT
    with caplog.at_level(logging.DEBUG):
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # reset: the visitor is gone
        wait_for(lambda: (tmp_path / "log").exists(), 15, "the defer_always note")
    assert "always streamer" in (tmp_path / "log").read_text()
    assert "done streamer" not in (tmp_path / "log").read_text()
    assert "failed (the body was not sent to the end): skipping its deferred note" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "gave up on it (the visitor left)" in caplog.text
    assert running.client().request("/").status == 200


@pytest.mark.slow
def test_slow_request_log_shows_where_it_is(serve, caplog):
    running = serve(apps.stuck_in_the_app, slow_request=0.3)
    with caplog.at_level(logging.WARNING, "fcgi.slow"):
        assert running.client().request("/?1.2").status == 200
    pid = running.server.pid
    assert f"slow request: request {pid}-1 (GET /?1.2) running for" in caplog.text
    assert "in stuck_in_the_app" in caplog.text
    assert running.server.watchdog.slow == 1


@pytest.mark.slow
def test_slow_deferred_and_deferred_timeout(serve, caplog):
    done = threading.Event()

    async def hangs():
        await asyncio.sleep(30)

    def crawls():
        time.sleep(1)
        done.set()

    def inner(environ, start_response):
        defer(environ, hangs)
        defer(environ, crawls)
        start_response("200 OK", [])
        return [b"ok"]

    app = DeferredMiddleware(inner)
    running = serve(app, slow_deferred=0.3, deferred_timeout=0.5)
    with caplog.at_level(logging.WARNING, "wsgi_app.deferred"):
        assert running.client().request("/slow").body == b"ok"
        assert done.wait(10)
    assert (
        "deferred " in caplog.text
        and "hangs() cancelled after 0.5 s (request GET /slow)" in caplog.text
    )
    assert "slow deferred " in caplog.text and "crawls() running for" in caplog.text
    assert "time.sleep(1)" in caplog.text  # the stack of the pool thread
    assert app.stats()["failed"] == 1


def test_stopping_waits_for_the_first_request_of_a_new_connection(serve):
    """nginx retries a request when a reused connection is closed under it, not a new
    one: a stop must not close a just-accepted connection before its request arrives."""
    running = serve(apps.hello)
    fresh = running.client()
    wait_for(lambda: len(running.server.conns) == 1, what="the new connection accepted")
    assert running.client().request("/").status == 200
    running.server.stop()
    wait_for(lambda: running.server.stopping, what="the stop")
    assert fresh.request("/").status == 200


@pytest.mark.e2e
def test_recycling_every_50_requests_under_load_fails_no_request(tmp_path):
    with stack(tmp_path, numprocs=2, FCGI_MAX_REQUESTS="50", FCGI_MAX_REQUESTS_JITTER="10") as (
        port,
        ctl,
    ):
        pids = set(re.findall(r"pid (\d+)", ctl("status", "app:*")))
        statuses: list[int] = []
        folder = tmp_path / "var" / "log"

        def recycled() -> int:
            return sum(p.read_text().count("restarting in place") for p in folder.glob("app_*.log"))

        # under load until ten recycles (each one's import check takes longer on a busy
        # machine, so the load runs until they happened, not for a set time)
        deadline = time.monotonic() + 90
        done = threading.Event()

        def load() -> None:
            with HTTP(port) as client:
                while not done.is_set() and time.monotonic() < deadline:
                    statuses.append(client.get("/ping")[0].status)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: recycled() >= 10, 90, "ten recycles under load")
        finally:
            done.set()
            for t in threads:
                t.join(60)
        assert set(re.findall(r"pid (\d+)", ctl("status", "app:*"))) == pids
    logs = "".join(p.read_text() for p in folder.glob("app_*.log"))
    drained = [int(n) for n in re.findall(r"drained after (\d+) request\(s\); reloading", logs)]
    assert len(drained) >= 10 and min(drained) >= 50  # each recycle after its 50 requests
    assert set(statuses) == {200}, f"{len(statuses)} requests, {statuses.count(502)} were 502"
    exits = worker_exits(tmp_path / "var")
    assert not exits, exits  # recycled in place: supervisord saw no exit
