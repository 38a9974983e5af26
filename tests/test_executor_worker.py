"""The deferred executor in a real worker (python -m fcgi): a bounded stop, exact
counts across the status page, the access log and the exit log, and a worker
that keeps answering while its deferred backlog overflows."""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest

from tests.fcgi_client import Client
from tests.gate import Gate
from tests.procs import python_env, wait_for, worker

APP = "tests.apps_executor:executor"


def test_sys_exit_in_a_deferred_call_neither_stops_the_worker_nor_the_calls_after(tmp_path):
    log = tmp_path / "work.log"
    with worker(tmp_path, APP, env=python_env(TEST_APP_LOG=str(log))) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/exit").status == 200
        wait_for(lambda: log.exists() and log.read_text().count("after") == 10, what="ten calls")
        assert client.request("/work?n=1&s=0&tag=later").status == 200  # still taking work
        wait_for(lambda: "done later-0" in log.read_text(), what="the next request's call")
        client.close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    text = (tmp_path / "app.log").read_text()
    assert "deferred exit(3) failed (request GET /exit)" in text and "SystemExit: 3" in text
    assert log.read_text().splitlines()[:10] == [f"after {i}" for i in range(10)]


@pytest.mark.slow
def test_a_plain_call_that_never_returns_cannot_hold_the_stop(tmp_path):
    with worker(tmp_path, APP, "--graceful-timeout", "2") as (proc, sock):
        client = Client(str(sock))
        assert client.request("/hang").status == 200
        wait_for(  # started: it is logged as running, not as never started
            lambda: json.loads(client.request("/count").body)["running"] == 1,
            what="the call to start",
        )
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 3  # at the 2 s deadline: the call never returns
    text = (tmp_path / "app.log").read_text()
    assert re.search(
        r"deferred hang_forever\('x{40,}\.\.\.\) abandoned at stop, still running "
        r"\(request GET /hang\) id=\d+-1",
        text,
    )


@pytest.mark.slow
def test_every_call_ends_once_and_the_three_reports_agree(tmp_path):
    """More work than the graceful timeout allows: done + failed + abandoned == taken,
    on the status page, in the access log's deferred lines and in the exit log."""
    access = tmp_path / "access.log"
    args = ["--graceful-timeout", "1.5", "--access-log", str(access), "--status-path", "/status"]
    env = python_env(DEFERRED_THREADS="4")
    with worker(tmp_path, APP, *args, env=env) as (proc, sock):
        client = Client(str(sock))
        for i in range(10):  # 10 requests x 4 calls of 0.4 s, every 2nd failing, on 4 threads
            assert client.request(f"/work?n=4&s=0.4&fail=2&tag=r{i}").status == 200

        def status():
            data = json.loads(client.request("/status?json").body)
            keys = ("queued", "running", "done", "failed", "abandoned")
            return {k: data[f"deferred {k}"] for k in keys}

        # the status page adds up to every call taken, as the work goes on
        snap = wait_for(lambda: (s := status())["done"] > 0 and s, what="some calls done")
        assert sum(snap.values()) == 40, snap
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 3
    text = (tmp_path / "app.log").read_text()
    summary = re.search(
        r"deferred work at stop: (\d+) call\(s\) taken, (\d+) done, (\d+) failed, "
        r"(\d+) abandoned",
        text,
    )
    assert summary, text
    taken, done, failed, abandoned = map(int, summary.groups())
    assert taken == 40 and done + failed + abandoned == 40 and abandoned > 0 and failed > 0
    assert text.count("abandoned at stop") == abandoned
    assert text.count("RuntimeError: failing on purpose") == failed
    lines = [ln for ln in access.read_text().splitlines() if " deferred id=" in ln]
    counted = [
        tuple(int(x) for x in re.search(r"count=(\d+) .*failed=(\d+)", ln).groups()) for ln in lines
    ]
    assert len(lines) == 10  # one per request, finished or abandoned
    assert sum(c for c, _ in counted) == 40
    assert sum(f for _, f in counted) == failed + abandoned


def test_hello_stays_fast_while_the_deferred_backlog_overflows(tmp_path):
    """--threads 1: the I/O loop serves every request; overflowing work must never run there."""
    env = python_env(DEFERRED_THREADS="2", DEFERRED_BACKLOG="4")
    with worker(tmp_path, APP, "--graceful-timeout", "0.1", env=env) as (proc, sock):
        loading = threading.Event()
        stop = threading.Event()
        gate = Gate(tmp_path / "gate")

        def load() -> None:
            with_load = Client(str(sock))
            while not stop.is_set():
                with_load.request(f"/work?n=2&gate={gate.path}")  # held until the end
                loading.set()
            with_load.close()

        loader = threading.Thread(target=load)
        loader.start()
        try:
            assert loading.wait(10)
            client = Client(str(sock))
            wait_for(
                lambda: json.loads(client.request("/count").body)["overflowed"] > 0,
                what="the backlog to overflow",
            )
            # every call is held at the gate: one run on the loop's thread would hold
            # the loop, and these would never be answered
            for _ in range(100):
                assert client.request("/").status == 200
            stats = json.loads(client.request("/count").body)
            client.close()
        finally:
            stop.set()
            loader.join(10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 3  # the overflowed work was still queued: abandoned
        gate.open()
    assert stats["overflowed"] > 0 and stats["queued"] > 4
    assert "deferred backlog of 4 full" in (tmp_path / "app.log").read_text()


@pytest.mark.parametrize("option", ["run_on_error", "default"])
def test_a_request_that_failed_skips_its_calls_in_a_real_worker(tmp_path, option):
    log = tmp_path / "work.log"
    extra = {"DEFERRED_RUN_ON_ERROR": "1"} if option == "run_on_error" else {}
    env = python_env(TEST_APP_LOG=str(log), **extra)
    with worker(tmp_path, "tests.apps_executor:failing", env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/").status == 500
        assert client.request("/?ok").status == 200
        wait_for(lambda: log.exists() and "ok-call" in log.read_text(), what="the good one")
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    ran = sorted(log.read_text().split())  # two requests' calls: no order between them
    text = (tmp_path / "app.log").read_text()
    if option == "run_on_error":
        assert ran == ["always-call", "always-call", "failed-call", "ok-call"]
        assert "failed (the app raised RuntimeError): running its 2 deferred" in text
    else:
        assert ran == ["always-call", "always-call", "ok-call"]
        assert (
            "failed (the app raised RuntimeError): skipping its deferred note('failed-call')"
            in text
        )
