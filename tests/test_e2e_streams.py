"""Through real nginx (and HAProxy): visitors who leave in the middle of a stream,
requests that never end (--request-timeout), files sent with wsgi.file_wrapper."""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.procs import HTTP, nginx, python_env, wait_for, web_server, worker

pytestmark = pytest.mark.e2e

APP = "tests.apps_streams:app"


def noted(log: Path, event: str, tag: str) -> tuple[int, float] | None:
    """The last ``event tag`` line the app noted: (chunk count, time), or None."""
    if not log.exists():
        return None
    found = None
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[:2] == [event, tag]:
            found = (int(parts[2]), float(parts[3]))
    return found


def visit(port: int, path: str, body_bytes: int) -> tuple[socket.socket, bytes]:
    """A visitor who asks for ``path`` and reads the head and ``body_bytes`` more: the
    socket and what it read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < body_bytes:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(data)} bytes"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:100]
    return sock, data


def leave(visitor: tuple[socket.socket, bytes]) -> float:
    """Reset the visitor's connection, as a browser tab closed; returns when."""
    sock = visitor[0]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return time.time()


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "4"])
def test_a_visitor_who_leaves_stops_the_stream_and_never_holds_the_worker(tmp_path, threads):
    """A 100-chunk stream (4 KB, 0.1 s apart) left after 20 KB is closed within 2 s,
    fewer than 40 chunks pulled; an endless stream lets the worker answer others while it
    runs (its status page too, on --threads 1), and the next request once its visitor
    left. Each gets one info line and 499 in the access log."""
    log, access = tmp_path / "events.log", tmp_path / "access.log"
    args = ("--threads", threads, "--access-log", str(access), "--status-path", "/fcgi-status")
    with (
        worker(tmp_path, APP, *args, env=python_env(TEST_APP_LOG=str(log))) as (_proc, sock),
        nginx(tmp_path, sock) as port,
    ):
        left = leave(visit(port, "/stream?tag=cut", 20_000))
        pulled, closed = wait_for(lambda: noted(log, "closed", "cut"), 10, "the stream's close()")
        assert closed - left < 2.0, f"close() {closed - left:.2f} s after the visitor left"
        assert pulled < 40

        endless = visit(port, "/stream?tag=endless&count=0&gap=0.05", 8_000)
        with HTTP(port) as client:
            resp, body, _ = client.get("/fcgi-status")  # while the stream goes on
            assert resp.status == 200 and b"active processes" in body
            assert noted(log, "closed", "endless") is None
            left = leave(endless)
            resp, body, _ = client.get("/next")
            answered = time.time()
        assert (resp.status, body) == (200, b"ok\n")
        assert answered - left < 2.0
        wait_for(lambda: noted(log, "closed", "endless"), 10, "the endless stream's close()")

    text = (tmp_path / "app.log").read_text()
    gone = re.findall(
        r"request \d+-\d+ \(GET /stream\?tag=(\w+)\S*\): the web server gave up on it "
        r"\(the visitor left\) after (\d+) body byte\(s\); stopped",
        text,
    )
    assert sorted(tag for tag, _ in gone) == ["cut", "endless"], text
    assert all(int(sent) >= 8_000 for _, sent in gone)
    assert "Traceback" not in text
    lines = access.read_text().splitlines()
    assert len([ln for ln in lines if "/stream?tag=" in ln and " 499 " in ln]) == 2, lines


def one_thread(conf: str) -> str:
    """HAProxy multiplexes on a connection its own thread holds: one thread, so the
    requests of two visitors share one."""
    return conf.replace("global\n", "global\n    nbthread 1\n", 1)


@pytest.mark.slow
def test_haproxy_aborts_on_a_multiplexed_connection(tmp_path):
    """HAProxy multiplexes two visitors' requests on one FastCGI connection. One who
    leaves during an upload makes it send FCGI_ABORT_REQUEST for that request alone:
    answered, never run, and the stream beside it arrives whole. One who leaves a
    running stream is dropped by HAProxy without a word (it aborts only requests still
    being sent) and it closes the connection once the others on it have ended: the
    stream stops then."""
    log = tmp_path / "events.log"
    args = ("--threads", "4", "--log-level", "debug")
    with (
        worker(tmp_path, APP, *args, env=python_env(TEST_APP_LOG=str(log))) as (_proc, sock),
        web_server("haproxy", tmp_path / "haproxy", sock, one_thread) as port,
    ):
        kept, data = visit(port, "/stream?tag=kept&count=30&gap=0.1", 4_000)
        upload = socket.create_connection(("127.0.0.1", port), timeout=20)
        upload.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        upload.sendall(b"u" * 1_000_000)
        leave((upload, b""))
        left = leave(visit(port, "/stream?tag=cut", 20_000))
        while chunk := kept.recv(65536):
            data += chunk
            if data.endswith(b"\r\n0\r\n\r\n"):
                break
        kept_ended = time.time()
        kept.close()
        assert data.count(b"x") == 30 * 4096
        pulled, closed = wait_for(lambda: noted(log, "closed", "cut"), 10, "the stream's close()")
        assert closed - max(left, kept_ended) < 2.0 and pulled < 40
    text = (tmp_path / "app.log").read_text()
    assert re.search(r"request \d+ aborted by the web server before it was complete", text)
    assert "upload ran" not in log.read_text()
    assert len(re.findall(r"connection \d+: opened", text)) == 2  # the probe's, HAProxy's one


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
def test_request_timeout_answers_504_cuts_a_begun_response_and_reloads_in_place(tmp_path, threads):
    """--request-timeout 2: a request stuck for 30 s gets 504 within 6 s and one begun
    and then stuck is cut, each logged with its stack; others are answered meanwhile
    (with a thread free) and after; the worker reloads in place (same pid), which ends
    the stuck threads, and the status page counts both."""
    args = ("--threads", threads, "--request-timeout", "2", "--status-path", "/fcgi-status")
    with (
        worker(tmp_path, APP, *args) as (proc, sock),
        nginx(tmp_path, sock) as port,
    ):
        begun, _ = visit(port, "/stream?tag=stall&count=2&gap=30", 4_000)
        stuck = HTTP(port)
        started = time.monotonic()
        stuck.conn.request("GET", "/stuck?30")
        if threads != "1":  # the other thread answers while one is stuck
            with HTTP(port) as other:
                assert other.get("/during")[0].status == 200
        resp = stuck.conn.getresponse()
        assert (resp.status, resp.read()) == (504, b"Gateway Timeout\n")
        assert time.monotonic() - started < 6.0
        stuck.conn.close()
        rest = b""
        while chunk := begun.recv(65536):  # the stalled stream ends cut: no last chunk
            rest += chunk
        begun.close()
        assert not rest.endswith(b"0\r\n\r\n")
        log = tmp_path / "app.log"
        wait_for(lambda: log.read_text().count("serving on") == 2, 30, "the reload")
        with HTTP(port) as after:
            assert after.get("/after")[0].status == 200
            status = after.get("/fcgi-status")[1].decode()
        assert "request timeouts:     2\n" in status, status
        assert proc.poll() is None
    text = log.read_text()
    for path, outcome in (("/stuck?30", "answered 504"), ("/stream", "connection cut")):
        assert re.search(
            rf"request timed out: request {proc.pid}-\d+ \(GET {re.escape(path)}\S*\) running "
            rf"for [\d.]+ s \(--request-timeout 2\), thread \d+; [^\n]*{outcome}",
            text,
        ), text
    assert 'in app\n    time.sleep(float(environ["QUERY_STRING"]))' in text  # the stack
    assert "in __next__\n    time.sleep(self.gap)" in text
    assert text.count("restarting in place") == 1
