"""The request path rewritten for speed answers as the one before it: records in any
split, broken pairs, detaching, a fork in C, the CPU binding with a stale FCGI_CPUS."""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import struct
import threading
from pathlib import Path

import pytest
from flup.server import fcgi_base as flup

from fcgi.wire import records
from fcgi.wire.connection import Connection, RequestAborted, RequestReady
from tests.fcgi_client import Client, body_of, record
from tests.procs import python_env, wait_for, worker

CASES = Path(__file__).parent / "protocol_cases"
VALUES = {"FCGI_MAX_CONNS": "10", "FCGI_MAX_REQS": "1", "FCGI_MPXS_CONNS": "0"}
OK = [("Content-Type", "text/plain")]


# -- apps for the worker (imported by it as tests.test_review_perf:NAME) ----------------


def forking_in_c(environ, start_response):
    """Forks through libc, as a C extension would (no os.fork(), so no at-fork hooks run);
    the child returns into the worker as a careless app's would. The parent waits up to
    30 s for the child to leave, then kills it, and answers."""
    child = ctypes.PyDLL(None).fork()  # PyDLL: the GIL is held across the call
    if child:
        pidfd = os.pidfd_open(child)
        if not select.select([pidfd], [], [], 30)[0]:  # it went on as a worker: end it
            os.kill(child, signal.SIGKILL)
        os.close(pidfd)
        os.waitpid(child, 0)
        start_response("200 OK", OK)
        return [b"parent"]
    start_response("200 OK", OK)
    return [b"child"]


# -- a forked child returning into the worker ---------------------------------------------


@pytest.mark.parametrize("threads", ["1", "4"])
def test_a_child_forked_in_c_returning_into_the_worker_exits(tmp_path, threads):
    """A fork made in C (a C extension, ctypes) runs no ``os.register_at_fork`` hook: the
    worker compares pids, so the child exits instead of answering the request or going
    on as a second worker on the same sockets."""
    with worker(tmp_path, "tests.test_hot_path:forking_in_c", "--threads", threads) as (
        proc,
        sock,
    ):
        client = Client(str(sock), timeout=10)
        try:
            body = client.request("/").body
        finally:
            client.close()
        assert body == b"parent"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "returned into the worker; the child exits" in (tmp_path / "app.log").read_text()


# -- --cpu-affinity -------------------------------------------------------------------------


def test_a_stale_cpu_list_in_the_environment_does_not_stop_the_worker(tmp_path):
    """``FCGI_CPUS`` (exported by a worker, kept across a reload) may name a CPU this
    process can no longer use (a narrowed cpuset, a CPU taken offline; here one that does
    not exist): the worker binds among the CPUs it has now and serves."""
    allowed = sorted(os.sched_getaffinity(0))
    env = python_env(FCGI_CPUS=f"{allowed[0]},4095")
    with worker(tmp_path, "tests.apps:hello", "--cpu-affinity", "1", env=env) as (proc, sock):
        client = Client(str(sock))
        try:
            assert client.request("/").status == 200
        finally:
            client.close()
        expected = {allowed[1 % len(allowed)]} if len(allowed) > 1 else set(allowed)
        assert os.sched_getaffinity(proc.pid) == expected


# -- the sans-I/O connection: the inline parser against the same bytes in other pieces -------


def _pairs(pairs: dict[bytes, bytes]) -> bytes:
    return b"".join(flup.encode_pair(k, v) for k, v in pairs.items())


def _padded(rtype: int, rid: int, content: bytes = b"", pad: int = 0) -> bytes:
    return struct.pack("!BBHHBx", 1, rtype, rid, len(content), pad) + content + b"\0" * pad


def _feed(data: bytes, cuts: list[int], max_params: int = 4096) -> tuple[list, bytes, str | None]:
    conn = Connection(VALUES, max_params=max_params)
    seen: list = []
    sent = b""
    pos = 0
    events: list = []
    try:
        for cut in [*cuts, len(data)]:
            for event in conn.receive_data(data[pos:cut]):
                events.append(event)
                if isinstance(event, RequestReady):
                    req = event.request
                    seen.append(("ready", req.id, req.params, body_of(events, req), req.error))
                elif isinstance(event, RequestAborted):
                    seen.append(("aborted", event.request_id))
            sent += b"".join(conn.data_to_send())
            pos = cut
    except records.ProtocolError:
        return seen, sent, "error"
    return seen, sent, None


def _odd_but_valid() -> bytes:
    long_name, long_value = b"HTTP_X_" + b"N" * 200, b"V" * 70000  # 4-byte lengths, high bit
    params = _pairs({b"REQUEST_METHOD": b"POST", long_name: long_value, b"CONTENT_LENGTH": b"5"})
    pieces = [params[i : i + 997] for i in range(0, len(params), 997)]  # several PARAMS records
    return b"".join(
        [
            _padded(flup.FCGI_BEGIN_REQUEST, 0, struct.pack("!HB5x", 1, 1), 3),  # id 0: refused
            _padded(flup.FCGI_GET_VALUES, 0, _pairs({b"FCGI_MPXS_CONNS": b""}), 5),
            _padded(flup.FCGI_BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1), 7),
            *(_padded(flup.FCGI_PARAMS, 1, p, i % 8) for i, p in enumerate(pieces)),
            _padded(flup.FCGI_PARAMS, 1, b"", 255),
            _padded(flup.FCGI_STDIN, 1, b"he", 1),
            _padded(flup.FCGI_STDIN, 1, b"llo", 0),
            _padded(flup.FCGI_STDIN, 1, b"", 2),
            _padded(flup.FCGI_STDIN, 1, b"late, dropped", 0),  # after READY: dropped
            _padded(flup.FCGI_BEGIN_REQUEST, 2, struct.pack("!HB5x", 1, 1), 0),  # CANT_MPX
            _padded(flup.FCGI_PARAMS, 2, b"", 0),  # of the refused id: ignored
            _padded(flup.FCGI_ABORT_REQUEST, 1, b"", 4),  # running: END_REQUEST + event
            _padded(flup.FCGI_ABORT_REQUEST, 1, b"", 0),  # ended: ignored
        ]
    )


def test_odd_but_valid_records_give_the_same_result_whatever_the_reads():
    """Padding everywhere, BEGIN_REQUEST with id 0, a params stream over many PARAMS records
    with 4-byte (high bit) lengths, STDIN after READY, records for refused and ended ids:
    the same events and answers whole, split at every point in two, and byte by byte."""
    data = _odd_but_valid()
    whole = _feed(data, [], 1 << 20)
    assert whole[2] is None
    events = whole[0]
    assert [e[0] for e in events] == ["ready", "aborted"]
    assert events[0][3] == b"hello" and events[0][2]["HTTP_X_" + "N" * 200] == "V" * 70000
    for cut in range(0, len(data), 97):
        assert _feed(data, [cut], 1 << 20) == whole, cut
    assert _feed(data, list(range(1, len(data))), 1 << 20) == whole


@pytest.mark.parametrize("case", sorted((CASES / "invalid").glob("*.json")), ids=lambda p: p.stem)
def test_invalid_sequences_fed_byte_by_byte_are_still_protocol_errors(case):
    from tests.test_connection import encode

    data = b"".join(encode(r) for r in json.loads(case.read_text())["records"])
    assert _feed(data, list(range(1, len(data))))[2] == "error"


@pytest.mark.parametrize(
    "content",
    [
        b"\x05",  # a name length and nothing more
        b"\x80\x00",  # a 4-byte length cut short
        b"\x01\x80\x00\x00",  # a 4-byte value length cut short
        b"\x03\x01ab",  # the pair overruns its record
        b"\x01\x01ab\x02\x02abc",  # the second pair overruns
        b"\x80\x00\x00\x01",  # 4-byte name length, value length missing
        b"\x01\x80\x00\x00\x05a",  # 4-byte value length overruns
    ],
)
def test_broken_pairs_split_over_params_records_are_protocol_errors(content):
    data = (
        record(flup.FCGI_BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 1))
        + b"".join(record(flup.FCGI_PARAMS, 1, content[i : i + 1]) for i in range(len(content)))
        + record(flup.FCGI_PARAMS, 1)
    )
    assert _feed(data, [])[2] == "error"
    assert _feed(data, list(range(1, len(data))))[2] == "error"


# -- early finish: who is counted as detached -------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("max_detached", [0, 2])
@pytest.mark.parametrize("where", ["serving", "other"])
def test_detached_count_per_request(serve, threads, max_detached, where):
    """A finish on the serving thread counts (up to --max-detached), one from a thread of
    the app's own never does; after the requests the count is back to 0, and the thread
    runner has exactly --threads threads again."""
    seen: list[int] = []
    holder: dict = {}

    def app(environ, start_response):
        start_response("200 OK", OK)
        finish = environ["fcgi.finish_request"]
        if where == "serving":
            finish()
        else:
            t = threading.Thread(target=finish)
            t.start()
            t.join()
        seen.append(holder["runner"].detached)
        return [b"dropped"]

    running = serve(app, threads=threads, max_detached=max_detached)
    holder["runner"] = running.server.runner
    for _ in range(3):
        resp = running.client().request("/")
        assert (resp.status, resp.body) == (200, b"")
        wait_for(lambda: not running.server.in_progress, what="the request to end")
    runner = running.server.runner
    assert runner.detached == 0
    counted = 1 if where == "serving" and max_detached else 0
    assert seen == [counted] * 3
    if threads > 1:
        wait_for(lambda: len(runner._workers) == threads, what="the thread pool size")
