"""The I/O core under pressure: slow readers, many idle connections, strict params,
write timeouts, request ids across restarts, the detached-request limit."""

from __future__ import annotations

import logging
import resource
import socket
import subprocess
import threading
import time

import pytest
from flup.server import fcgi_base as flup

from tests import apps, apps_core
from tests.fcgi_client import Client, record, request_bytes
from tests.gate import Gate
from tests.procs import ROOT, connectable, fcgi_command, free_port, python_env, stop, wait_for


def test_a_stalled_reader_does_not_delay_other_clients(serve):
    running = serve(apps_core.sized, threads=4)
    stalled = running.client()
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.send(request_bytes("/?20000000"))
    wait_for(
        lambda: any(c.out_size > 0 for c in list(running.server.conns.values())),
        what="the 20 MB response to back up",
    )
    stalled.send(record(flup.FCGI_GET_VALUES, 0))  # any record: the loop must read it at once
    other = running.client()
    for _ in range(5):
        assert other.request("/?100").body == b"x" * 100
    # answered while the stalled response still waits, and that one does not fill memory
    queued = max(c.out_size for c in list(running.server.conns.values()))
    assert 0 < queued < 4 << 20


@pytest.mark.slow
def test_write_timeout_closes_a_connection_that_reads_nothing(serve, caplog):
    running = serve(apps_core.sized, threads=2, write_timeout=1)
    stalled = running.client()
    stalled.send(request_bytes("/?20000000"))
    wait_for(lambda: len(running.server.conns) == 1, what="the connection accepted")
    with caplog.at_level(logging.WARNING, "fcgi"):
        wait_for(lambda: len(running.server.conns) == 0, 10, "the stalled connection to close")
    assert "read nothing for 1 s (--write-timeout)" in caplog.text
    assert running.client().request("/?5").body == b"xxxxx"


@pytest.mark.slow
def test_write_timeout_is_per_stall_not_per_response(serve):
    running = serve(apps_core.sized, threads=2, write_timeout=1)
    client = running.client()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.send(request_bytes("/?3000000"))
    got = 0
    started = time.monotonic()
    while (rec := client.read_record()) is not None and rec[0] != flup.FCGI_END_REQUEST:
        got += len(rec[2])
        time.sleep(0.03)  # slow, but always reading: 3 MB take well over a second
    assert rec is not None and got > 3_000_000
    assert time.monotonic() - started > 1


def test_five_thousand_idle_connections_and_a_fresh_request(serve):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 12000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 12000), hard))
    running = serve(apps.hello)  # --max-connections 4096 by default
    idle = []
    for _ in range(5000):
        client = Client(str(running.path))
        client.send(request_bytes("/"))
        assert client.read_response().status == 200
        idle.append(client)  # kept alive, idle, as nginx keeps them
    try:
        fresh = Client(str(running.path))  # an idle one is closed to admit it
        assert fresh.request("/").status == 200
        fresh.close()
        assert len(running.server.conns) <= 4096
    finally:
        for client in idle:
            client.close()


@pytest.mark.parametrize("length", ["\u00b2", "9" * 23, "-1", "12 "])
def test_bad_content_length_is_a_400_with_one_warning(serve, caplog, length):
    running = serve(apps.echo, status_path="/status")
    client = running.client()
    with caplog.at_level(logging.WARNING, "fcgi"):
        resp = client.request("/", method="POST", extra={"CONTENT_LENGTH": length})
    assert resp.status == 400
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CONTENT_LENGTH" in warnings[0].getMessage()
    assert client.request("/", method="POST", body=b"ok").body == b"ok"
    assert client.request("/status").status == 200


def test_requests_beyond_max_detached_hold_their_thread(serve, tmp_path):
    running = serve(apps_core.finish_then_wait, threads=1, max_detached=1)
    with Gate(tmp_path / "gate") as gate:
        first, second, third = (running.client() for _ in range(3))
        # the first detaches; the second cannot (limit 1) and keeps the loop's thread
        assert first.request(f"/?{gate.path}").status == 200
        assert second.request(f"/?{gate.path}").status == 200
        third.send(request_bytes(f"/?{gate.path}"))
        third.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # nobody reads it while both wait at the gate
            third.read_response()
        third.sock.settimeout(30)
    assert third.read_response().status == 200  # the gate opened: the loop is free again


def test_many_clients_racing_at_max_connections_are_all_answered(serve):
    running = serve(apps.hello, threads=4, max_connections=4)
    answered = []

    def one() -> None:
        client = Client(str(running.path))
        client.send(request_bytes("/", keep_conn=False))
        answered.append(client.read_response().status)
        client.close()

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert answered == [200] * 40


def test_request_ids_stay_unique_across_in_place_restarts(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "app.sock")
    listener.bind(path)
    listener.listen(64)
    log = open(tmp_path / "app.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        fcgi_command("--max-requests", "3", "tests.apps_core:request_id"),
        stdin=listener,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=python_env(),
    )
    listener.close()
    try:
        ids = []
        log_path = tmp_path / "app.log"
        # A recycle begins once the new code is checked (a child imports it): go on
        # until two have happened.
        deadline = time.monotonic() + 30
        while len(ids) < 10 or log_path.read_text().count("restarting in place") < 2:
            client = Client(path)
            ids.append(client.request("/").body.decode())
            client.close()
            assert time.monotonic() < deadline, "no recycle"
        assert len(set(ids)) == len(ids), ids
        assert {i.split("-")[0] for i in ids} == {str(proc.pid)}  # same process throughout
        assert (tmp_path / "app.log").read_text().count("restarting in place") >= 2
    finally:
        stop(proc)
        log.close()


@pytest.mark.parametrize("bind", ["unix", "tcp"])
def test_recycling_with_bind_restarts_in_place_keeping_its_socket(tmp_path, bind):
    """A socket of the worker's own survives the exec too (fcgi.reload hands it over)."""
    port = free_port()
    address = f"unix:{tmp_path / 'app.sock'}" if bind == "unix" else f"127.0.0.1:{port}"
    log = open(tmp_path / "app.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        fcgi_command("--bind", address, "--max-requests", "2", "tests.apps_core:request_id"),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=python_env(),
    )
    try:
        target = str(tmp_path / "app.sock") if bind == "unix" else ("127.0.0.1", port)
        wait_for(lambda: connectable(target), what="the worker's socket")
        ids = []
        deadline = time.monotonic() + 20
        while (tmp_path / "app.log").read_text().count("serving on") < 2:
            client = Client(target)
            ids.append(client.request("/").body.decode())
            client.close()
            assert time.monotonic() < deadline, "no recycle"
        client = Client(target)  # the same socket, in the fresh interpreter
        ids.append(client.request("/").body.decode())
        client.close()
        assert {i.split("-")[0] for i in ids} == {str(proc.pid)}
        assert len(set(ids)) == len(ids)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        log.close()
    text = (tmp_path / "app.log").read_text()
    assert "recycling after 2 requests" in text and "restarting in place" in text
    assert not (tmp_path / "app.sock").exists()
