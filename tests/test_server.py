"""The worker in-process: protocol conformance, environ, finish_request, bodies."""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time

import pytest
from flup.server import fcgi_base as flup

from fcgi.wire import records
from tests import apps
from tests.fcgi_client import begin, params, record, request_bytes, stdin
from tests.gate import Gate, wait_at
from tests.procs import wait_for


def test_hello_and_keep_conn_reuse(serve):
    client = serve(apps.hello).client()
    for _ in range(3):
        resp = client.request("/")
        assert resp.status == 200
        assert resp.body == b"Hello world\n"
        assert resp.end == (0, records.REQUEST_COMPLETE)
    ends = [r for r in resp.records if r[0] == flup.FCGI_END_REQUEST]
    assert len(ends) == 1


def test_without_keep_conn_the_socket_closes(serve):
    client = serve(apps.hello).client()
    client.send(request_bytes("/", keep_conn=False))
    resp = client.read_response()
    assert resp.status == 200
    assert client.read_record() is None  # EOF


def test_get_values(serve):
    client = serve(apps.hello, threads=3).client()
    query = b"".join(
        flup.encode_pair(n.encode(), b"")
        for n in ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS", "OTHER")
    )
    client.send(record(flup.FCGI_GET_VALUES, 0, query))
    rtype, rid, content = client.read_record()
    assert (rtype, rid) == (flup.FCGI_GET_VALUES_RESULT, 0)
    values = records.decode_pairs(content)
    assert values["FCGI_MPXS_CONNS"] == "1"
    assert values["FCGI_MAX_REQS"] == "19"  # --threads 3 plus --max-detached 16
    assert values["FCGI_MAX_CONNS"] == "4096"  # --max-connections
    assert "OTHER" not in values


def test_a_request_id_already_active_gets_cant_mpx(serve):
    client = serve(apps.php_style, threads=2).client()
    client.send(request_bytes("/?seconds=0.5") + begin(rid=1))
    ends = []
    while not any(status == records.REQUEST_COMPLETE for status in ends):
        rtype, _rid, content = client.read_record()
        if rtype == flup.FCGI_END_REQUEST:
            ends.append(struct.unpack(flup.FCGI_EndRequestBody, content)[1])
    assert ends == [records.CANT_MPX_CONN, records.REQUEST_COMPLETE]


def test_unknown_role_and_unknown_type(serve):
    client = serve(apps.hello).client()
    client.send(begin(rid=1, role=flup.FCGI_AUTHORIZER))
    rtype, rid, content = client.read_record()
    assert (rtype, rid) == (flup.FCGI_END_REQUEST, 1)
    assert struct.unpack(flup.FCGI_EndRequestBody, content)[1] == records.UNKNOWN_ROLE
    client.send(record(42, 1, b"zz"))
    rtype, rid, content = client.read_record()
    assert rtype == flup.FCGI_UNKNOWN_TYPE and content[0] == 42
    assert client.request("/").status == 200  # the connection still serves


def test_abort_before_the_request_runs(serve):
    client = serve(apps.hello).client()
    client.send(
        begin(1) + params(1, {"REQUEST_METHOD": "GET"}) + record(flup.FCGI_ABORT_REQUEST, 1)
    )
    rtype, _rid, content = client.read_record()
    assert rtype == flup.FCGI_STDOUT and content == b""
    rtype, _rid, content = client.read_record()
    assert rtype == flup.FCGI_END_REQUEST and struct.unpack("!LB3x", content)[0] == 1
    assert client.request("/").status == 200


def test_abort_while_running_ends_it_and_drops_output(serve, tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()

    def slow(environ, start_response):
        write = start_response("200 OK", [])
        entered.set()
        release.wait(5)
        write(b"too late")
        return [b"and this"]

    # With --threads 1 the app runs on the loop thread, which reads the connection
    # again only once the app returns; with more threads the loop sees ABORT at once.
    client = serve(slow, threads=2).client()
    client.send(request_bytes("/"))
    assert entered.wait(5)
    client.send(record(flup.FCGI_ABORT_REQUEST, 1))
    resp = client.read_response()
    release.set()
    assert resp.stdout == b"" and resp.end[0] == 1
    assert client.request("/").body == b"too lateand this"  # the connection serves on
    assert b"too late" not in b"".join(r[2] for r in resp.records)


def test_finish_request_sends_everything_once_and_drops_later_writes(serve):
    seen: dict[str, object] = {}
    done = threading.Event()

    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"program start...")
        seen["first"] = environ["fcgi.finish_request"]()
        seen["second"] = environ["fcgi.finish_request"]()
        write(b"debug...")
        done.set()
        return [b"tail"]

    running = serve(app)
    client = running.client()
    resp = client.request("/")
    assert resp.body == b"program start..."
    assert done.wait(5)
    assert seen == {"first": True, "second": False}
    # nothing of the dropped output arrives before the next response
    resp2 = client.request("/")
    assert resp2.body == b"program start..."
    assert [r[0] for r in resp2.records].count(flup.FCGI_END_REQUEST) == 1


def test_php_style_request_does_not_hold_the_serving_thread(serve, tmp_path, monkeypatch):
    monkeypatch.setattr(apps, "LOG", str(tmp_path / "log"))
    client = serve(apps.php_style, threads=1).client()
    log = tmp_path / "log"
    with Gate(tmp_path / "gate") as gate:
        for i in range(3):  # each answered while the tails before it wait at the gate
            assert client.request(f"/?gate={gate.path}&tag={i}").body == b"program start...\n"
        # all three held at once, on threads of their own; none done
        wait_for(lambda: log.read_text().count("waiting") == 3, what="three tails at the gate")
        assert "done" not in log.read_text()
    wait_for(lambda: log.read_text().count("done") == 3, 10, "the three tails")
    done = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("done")]
    assert sorted(done) == ["0", "1", "2"]


def test_environ_passes_wsgiref_validate(serve, caplog):
    client = serve(apps.validated).client()
    with caplog.at_level(logging.WARNING, "fcgi.app"):
        resp = client.request(
            "/a/b?x=1",
            method="POST",
            body=b"hello",
            extra={"HTTP_CONTENT_TYPE": "x", "CONTENT_TYPE": "text/plain"},
        )
    assert resp.status == 200, resp.stdout
    assert resp.body == b"ok 5"
    assert "checked" in caplog.text  # wsgi.errors reaches the worker's log


def test_path_split_and_scheme(serve):
    client = serve(apps.echo).client()
    resp = client.request("/x", extra={"SCRIPT_NAME": "/some/path", "PATH_INFO": "", "HTTPS": "on"})
    assert b"X-Script-Name: []\r\n" in resp.head + b"\r\n"
    assert b"X-Path-Info: [/some/path]" in resp.head
    assert b"X-Scheme: https" in resp.head


def test_large_upload_is_spooled_and_echoed(serve):
    running = serve(apps.echo, spool_threshold=64 * 1024)
    body = bytes(range(256)) * 8000  # 2 MB
    resp = running.client().request("/", method="POST", body=body)
    assert resp.body == body


@pytest.mark.parametrize("size", [-1, -5])
@pytest.mark.parametrize("length", [1000, 5000], ids=["in-memory", "spooled"])
def test_negative_read_size_reads_the_whole_body_in_memory_or_spooled(serve, size, length):
    running = serve(apps.echo_read, spool_threshold=2048)
    body = bytes(range(256)) * (length // 256) + b"end"
    resp = running.client().request(f"/?{size}", method="POST", body=body)
    assert resp.status == 200, resp.stdout[:300]
    assert resp.body == body


def test_streamed_download_intact(serve):
    resp = serve(apps.download).client().request("/?1000000")
    assert len(resp.body) == 1_000_000
    assert resp.body[:512] == bytes(range(256)) * 2


def test_app_error_gives_500_and_the_worker_goes_on(serve, caplog):
    client = serve(apps.boom).client()
    with caplog.at_level(logging.ERROR, "fcgi"):
        resp = client.request("/")
    assert resp.status == 500
    assert "RuntimeError: boom" in caplog.text
    assert client.request("/").status == 500


def test_error_mid_body_cuts_the_connection_without_end_request(serve):
    running = serve(apps.fail_after)
    for _ in range(2):  # the same worker serves on
        client = running.client()
        client.send(request_bytes("/"))
        records = []
        while (rec := client.read_record()) is not None:
            records.append(rec)
        assert b"partial" in b"".join(r[2] for r in records)
        assert flup.FCGI_END_REQUEST not in [r[0] for r in records]  # never looks whole
        assert not [r for r in records if r[0] == flup.FCGI_STDOUT and not r[2]]


def test_bad_record_version_closes_only_that_connection(serve):
    running = serve(apps.hello)
    bad = running.client()
    bad.send(b"\x02" + bytes(7))
    assert bad.read_record() is None
    assert running.client().request("/").status == 200


def test_more_clients_than_threads_each_get_their_own_response(serve):
    running = serve(apps.echo, threads=2)
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        client = running.client()
        body = f"client {i}".encode() * 100
        results[i] = client.request("/", method="POST", body=body).body == body

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == dict.fromkeys(range(20), True)


def test_stdin_in_pieces(serve):
    client = serve(apps.echo).client()
    data = (
        begin(1)
        + params(1, {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "6"})
        + stdin(1, b"abcdef")
    )
    for i in range(len(data)):  # one byte at a time
        client.send(data[i : i + 1])
    assert client.read_response().body == b"abcdef"


def test_mount_point_splits_the_path_and_refuses_what_is_outside(serve):
    client = serve(apps.echo, mount="/app").client()
    resp = client.request("/x", extra={"SCRIPT_NAME": "/app/x/y", "PATH_INFO": ""})
    assert b"X-Script-Name: [/app]\r\n" in resp.head + b"\r\n"
    assert b"X-Path-Info: [/x/y]" in resp.head
    resp = client.request("/x", extra={"SCRIPT_NAME": "", "PATH_INFO": "/app"})
    assert b"X-Path-Info: []\r\n" in resp.head + b"\r\n"
    for outside in ("/other", "/application", "/"):
        resp = client.request(outside, extra={"SCRIPT_NAME": "", "PATH_INFO": outside})
        assert resp.status == 404, outside


def test_request_ids_are_unique_with_many_threads(serve):
    seen: list[str] = []

    def app(environ, start_response):
        seen.append(environ["fcgi.request_id"])
        start_response("200 OK", [])
        return [b""]

    running = serve(app, threads=4)
    threads = [
        threading.Thread(target=lambda: [running.client().request("/") for _ in range(10)])
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 60 and len(set(seen)) == 60


def test_multithread_is_true_when_requests_can_run_side_by_side(serve):
    flags = []

    def app(environ, start_response):
        flags.append(environ["wsgi.multithread"])
        start_response("200 OK", [])
        return [b""]

    serve(app, threads=1, max_detached=0).client().request("/")
    serve(app, threads=1).client().request("/")
    assert flags == [False, True]


@pytest.mark.parametrize(
    "method,status",
    [("HEAD", "200 OK"), ("GET", "204 No Content"), ("GET", "304 Not Modified")],
)
@pytest.mark.parametrize("shape", ["list", "lazy"])
def test_head_204_and_304_send_no_body_and_the_iterable_is_still_closed(
    serve, method, status, shape
):
    closed = []

    class Body(list):
        def close(self):
            closed.append(True)

    def lazy():
        try:
            yield b"body"
        finally:
            closed.append(True)

    def app(environ, start_response):
        start_response(status, [("Content-Length", "4"), ("X-Shape", shape)])
        return Body([b"body"]) if shape == "list" else lazy()

    client = serve(app, threads=2).client()
    resp = client.request("/", method=method)
    assert (resp.status, resp.body) == (int(status[:3]), b"")
    assert b"Content-Length: 4" in resp.head and closed == [True]
    assert client.request("/", method=method).status == int(status[:3])  # kept connection


def test_empty_content_length_and_type_are_left_out_of_the_environ(serve):
    from tests.apps_streams import app

    client = serve(app).client()
    empty = {"CONTENT_TYPE": "", "CONTENT_LENGTH": ""}
    assert client.request("/environ", extra=empty).body == b"neither"
    resp = client.request("/environ", method="POST", body=b"x", extra={"CONTENT_TYPE": "a/b"})
    assert resp.body == b"CONTENT_LENGTH='1' CONTENT_TYPE='a/b'"


def test_write_after_an_abort_raises_client_disconnected(serve, caplog):
    """An OSError the app may catch; the worker logs one info line, no error."""
    from fcgi.wsgi.request import ClientDisconnected

    seen = []

    def app(environ, start_response):
        write = start_response("200 OK", [])
        try:
            while True:
                write(b"x" * 1000)
                time.sleep(0.01)
        except OSError as exc:
            seen.append(exc)
        return []

    running = serve(app, threads=2)
    client = running.client()
    client.send(request_bytes("/"))
    assert client.read_record()[0] == flup.FCGI_STDOUT
    with caplog.at_level(logging.INFO, "fcgi"):
        client.send(record(flup.FCGI_ABORT_REQUEST, 1))
        assert client.read_response().end[0] == 1
        wait_for(lambda: not running.server.in_progress, what="the app to stop")
    (exc,) = seen
    assert type(exc) is ClientDisconnected and isinstance(exc, ConnectionError)
    assert exc.errno == errno.ECONNABORTED
    lines = [r.getMessage() for r in caplog.records if r.name == "fcgi"]
    assert [m for m in lines if "gave up on it (the visitor left)" in m], lines
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_file_wrapper_under_the_middleware_keeps_the_fast_way_and_its_deferred_rule(
    serve, tmp_path, monkeypatch
):
    """DeferredMiddleware hands the server's own file wrapper back to it (sent by blocks,
    not iterated), and runs the request's deferred call once the file was sent to the end;
    a download aborted midway is a body cut short: its call is skipped."""
    from fcgi.wsgi import files
    from wsgi_app.deferred import DeferredMiddleware, defer

    data = bytes(range(256)) * (8 << 12)  # 8 MB
    (tmp_path / "f.bin").write_bytes(data)
    ran, sent = [], []
    settle = files.Blocks.settle
    monkeypatch.setattr(
        files.Blocks, "settle", lambda self: sent.append(self.offset) or settle(self)
    )

    def inner(environ, start_response):
        defer(environ, ran.append, environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return environ["wsgi.file_wrapper"](open(tmp_path / "f.bin", "rb"))

    running = serve(DeferredMiddleware(inner), threads=2)
    client = running.client()
    assert client.request("/whole").body == data
    wait_for(lambda: ran == ["/whole"], what="the deferred call")
    assert sent == [len(data)]

    client.send(request_bytes("/cut"))
    assert client.read_record()[0] == flup.FCGI_STDOUT
    client.send(record(flup.FCGI_ABORT_REQUEST, 1))
    assert client.read_response().end[0] == 1  # (a web server reads on to END_REQUEST)
    wait_for(lambda: len(sent) == 2, what="the aborted download to stop")
    assert sent[1] < len(data) and ran == ["/whole"]


def test_a_request_that_returns_after_its_timeout_logs_no_application_error(
    serve, tmp_path, caplog
):
    """The worker answered 504 for it; when the app's thread comes back and calls
    start_response and writes, that is dropped quietly, not logged as the app's error."""
    returned = threading.Event()

    def late(environ, start_response):
        wait_at(environ["QUERY_STRING"])
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"too late")
        returned.set()
        return [b"and this"]

    running = serve(late, threads=2, request_timeout=0.5)
    client = running.client()
    with Gate(tmp_path / "gate") as gate, caplog.at_level(logging.INFO, "fcgi"):
        assert client.request(f"/?{gate.path}").status == 504
    assert returned.wait(10)
    wait_for(lambda: not running.server.in_progress, what="the app's thread to come back")
    assert not [r for r in caplog.records if "application error" in r.getMessage()]
    assert "request timed out" in caplog.text
