"""Several requests at once on one FastCGI connection (FCGI_MPXS_CONNS=1), as HAProxy's
fcgi-app sends them: against the sans-I/O core, then the worker in-process."""

from __future__ import annotations

import io
import logging
import struct
import threading
import time

from flup.server import fcgi_base as flup

from fcgi.wire import records
from fcgi.wire.connection import Connection, ConnState, RequestReady
from fcgi.wsgi.streams import RequestBody
from tests import apps
from tests.fcgi_client import HEADER, begin, body_of, params, record, request_bytes, stdin

VALUES = {"FCGI_MAX_CONNS": "10", "FCGI_MAX_REQS": "4", "FCGI_MPXS_CONNS": "1"}


def split_records(chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    data, out, pos = b"".join(chunks), [], 0
    while pos < len(data):
        _v, rtype, rid, clen, plen = HEADER.unpack_from(data, pos)
        out.append((rtype, rid, data[pos + 8 : pos + 8 + clen]))
        pos += 8 + clen + plen
    return out


def test_interleaved_requests_on_one_connection_each_get_their_own_answer():
    conn = Connection(VALUES, multiplex=True)
    env = {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "6"}
    # Request 1 and 2 arrive record by record, interleaved; 2 completes first.
    stream = [
        begin(1),
        begin(2),
        params(1, {**env, "PATH_INFO": "/one"}),
        params(2, {**env, "PATH_INFO": "/two"}),
        record(flup.FCGI_STDIN, 1, b"abc"),
        record(flup.FCGI_STDIN, 2, b"uvwxyz"),
        record(flup.FCGI_STDIN, 2),
        record(flup.FCGI_STDIN, 1, b"def"),
        record(flup.FCGI_STDIN, 1),
    ]
    events = []
    for rec in stream:
        events += conn.receive_data(rec)
    ready = [e.request for e in events if isinstance(e, RequestReady)]
    assert [r.id for r in ready] == [2, 1]
    assert [r.params["PATH_INFO"] for r in ready] == ["/two", "/one"]
    assert [body_of(events, r) for r in ready] == [b"uvwxyz", b"abcdef"]
    assert conn.state is ConnState.ACTIVE and set(conn.requests) == {1, 2}

    # Output interleaved by record: each record carries its own request id.
    out = conn.stdout(1, [b"one-a"]) + conn.stdout(2, [b"two-a"])
    out += conn.end_request(2, [b"two-b"]) + conn.stdout(1, [b"one-b"])
    assert conn.state is ConnState.ACTIVE  # 1 is still running: the connection is not free
    out += conn.end_request(1)
    assert conn.state is ConnState.IDLE and not conn.requests
    sent = split_records(out)
    stdout = {
        rid: b"".join(c for t, r, c in sent if t == flup.FCGI_STDOUT and r == rid) for rid in (1, 2)
    }
    assert stdout == {1: b"one-aone-b", 2: b"two-atwo-b"}
    ends = [(rid, content) for t, rid, content in sent if t == flup.FCGI_END_REQUEST]
    assert [rid for rid, _ in ends] == [2, 1]
    # The end of request 2's stream came before request 1's later output.
    order = [(t, r, bool(c)) for t, r, c in sent]
    assert order.index((flup.FCGI_STDOUT, 2, False)) < order.index((flup.FCGI_STDOUT, 1, True), 2)
    # Its own ids again, on the same connection.
    events = conn.receive_data(begin(2) + params(2, {"PATH_INFO": "/"}) + stdin(2))
    assert [e.request.id for e in events] == [2]


def test_refusals_are_logged_at_debug(caplog):
    conn = Connection(VALUES, multiplex=True)
    with caplog.at_level(logging.DEBUG, logger="fcgi"):
        conn.receive_data(begin(1) + begin(1) + begin(3, role=flup.FCGI_AUTHORIZER))
    sent = split_records(conn.data_to_send())
    statuses = [(rid, struct.unpack(flup.FCGI_EndRequestBody, c)[1]) for _t, rid, c in sent]
    assert statuses == [(1, records.CANT_MPX_CONN), (3, records.UNKNOWN_ROLE)]
    text = caplog.text
    assert "request 1 refused" in text and "CANT_MPX_CONN" in text
    assert "request 3 refused" in text and "UNKNOWN_ROLE" in text


def read_until_ends(client, count: int, deadline: float = 10.0) -> dict[int, tuple[bytes, float]]:
    """Records until ``count`` END_REQUESTs: each request's stdout and when it ended."""
    out: dict[int, bytes] = {}
    ended: dict[int, tuple[bytes, float]] = {}
    start = time.monotonic()
    while len(ended) < count and time.monotonic() - start < deadline:
        rtype, rid, content = client.read_record()
        if rtype == flup.FCGI_STDOUT:
            out[rid] = out.get(rid, b"") + content
        elif rtype == flup.FCGI_END_REQUEST:
            ended[rid] = (out.get(rid, b""), time.monotonic() - start)
    return ended


def test_many_requests_at_once_on_one_connection(serve):
    client = serve(apps.echo, threads=4).client()
    client.send(
        b"".join(
            request_bytes(f"/{rid}", method="POST", body=str(rid).encode() * 1000, rid=rid)
            for rid in range(1, 21)
        )
    )
    ended = read_until_ends(client, 20)
    assert set(ended) == set(range(1, 21))
    for rid, (stdout, _at) in ended.items():
        assert stdout.partition(b"\r\n\r\n")[2] == str(rid).encode() * 1000


def test_a_slow_request_does_not_hold_back_the_others_on_its_connection(serve):
    release = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            release.wait(5)
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    client = serve(app, threads=2).client()
    client.send(request_bytes("/slow", rid=1) + request_bytes("/fast", rid=2))
    rtype, rid, _content = client.read_record()
    while rtype != flup.FCGI_END_REQUEST:
        rtype, rid, _content = client.read_record()
    assert rid == 2  # the fast one ended while the slow one still ran
    release.set()
    assert read_until_ends(client, 1)[1][0].endswith(b"/slow")


def test_the_finish_frees_its_slot_at_once(serve):
    """A PHP-style request that finishes then sleeps 2 s does not hold back the next
    request on its multiplexed connection, even with --threads 1."""
    client = serve(apps.php_style, threads=1).client()
    client.send(request_bytes("/?seconds=2", rid=1))
    first = read_until_ends(client, 1)
    assert first[1][1] < 1.0
    started = time.monotonic()
    client.send(request_bytes("/?seconds=0", rid=2) + request_bytes("/?seconds=0", rid=1))
    ended = read_until_ends(client, 2)
    assert set(ended) == {1, 2} and time.monotonic() - started < 1.0


def test_a_request_without_keep_conn_closes_the_connection_after_the_others():
    conn = Connection(VALUES, multiplex=True)
    conn.receive_data(begin(1, keep_conn=False) + params(1, {"A": "b"}) + stdin(1))
    conn.receive_data(begin(2) + params(2, {"A": "b"}) + stdin(2))
    conn.end_request(1)
    assert conn.state is ConnState.ACTIVE and conn.is_active(2)  # 2 is not cut off
    conn.end_request(2)
    assert conn.state is ConnState.CLOSING


class StuckDisk(io.BytesIO):
    """A spool file on a disk that stalls: its first write waits until the test lets it."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.entered, self.release = entered, release

    def writelines(self, lines) -> None:
        self.entered.set()
        self.release.wait(30)
        super().writelines(lines)


def test_a_body_spooled_to_a_stalled_disk_holds_no_other_request_on_its_connection(
    serve, monkeypatch
):
    """The loop fills a request's body outside the connection's lock: while it waits on a
    stalled disk, a request multiplexed beside it still sends its output."""
    entered, release, go = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(
        RequestBody, "open_spool", staticmethod(lambda: StuckDisk(entered, release))
    )

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            return apps.echo(environ, start_response)
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"first ")
        go.wait(30)
        return [b"second"]

    running = serve(app, threads=2, spool_threshold=1024)
    client = running.client()
    client.sock.settimeout(10)
    try:
        client.send(request_bytes("/a", rid=1))
        upload = bytes(range(256)) * 64
        client.send(request_bytes("/b", method="POST", body=upload, rid=2))
        assert entered.wait(10), "the body never reached the spool file"
        go.set()  # request 1 ends while the loop waits on the disk for request 2
        assert client.read_response(1).body == b"first second"
    finally:
        release.set()
    assert client.read_response(2).body == upload
