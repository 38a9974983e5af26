"""The helper process (``process=True``): deferred calls run outside the worker's GIL,
counted in the worker, stopped within the graceful timeout."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from pathlib import Path

import pytest

from tests.apps_executor import note_pid
from tests.fcgi_client import Client
from tests.procs import python_env, wait_for, worker
from wsgi_app.runtime.calls import Batch, Call
from wsgi_app.runtime.executor import DeferredExecutor

APP = "tests.apps_executor:helper"


def test_picklable_calls_run_in_the_helper_the_rest_here(tmp_path, monkeypatch):
    log = tmp_path / "work.log"
    monkeypatch.setattr("tests.apps_executor.LOG", str(log))
    ran_here: list[int] = []
    executor = DeferredExecutor(process=True)
    executor.submit(Batch("GET /a", calls=[Call(note_pid), Call(int, ("x",))]))
    executor.submit(Batch("GET /b", calls=[Call(lambda: ran_here.append(os.getpid()))]))
    # all three ended: two done, the failing one (int("x")) in the helper, counted apart
    stats = wait_for(
        lambda: (s := executor.snapshot())["done"] + s["failed"] == 3 and s, what="all to end"
    )
    assert executor.drain(5) == 0
    pids = [int(line.split()[1]) for line in log.read_text().splitlines()]
    assert pids and pids[0] != os.getpid()  # in the helper
    assert ran_here == [os.getpid()]  # a lambda does not pickle: it ran here
    assert (stats["done"], stats["failed"], stats["registered"]) == (2, 1, 3)


@pytest.mark.slow
def test_a_hanging_call_in_the_helper_cannot_hold_the_stop(tmp_path):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    with worker(tmp_path, APP, "--graceful-timeout", "2", env=env) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/pid").status == 200
        wait_for(lambda: log.exists() and "pid" in log.read_text(), what="the helper's call")
        assert client.request("/hang").status == 200
        counts = wait_for(
            lambda: (c := json.loads(client.request("/count").body))["running"] and c,
            what="the hanging call to start",
        )
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 3  # at the 2 s deadline: the call never returns
    assert counts["done"] == 1
    helper = int(log.read_text().split()[1])
    assert helper != proc.pid
    assert (
        not Path(f"/proc/{helper}").exists()
        or "zombie" in Path(f"/proc/{helper}/status").read_text().lower()
    )
    text = (tmp_path / "app.log").read_text()
    assert f"deferred work runs in helper process {helper}" in text
    assert re.search(r"hang_forever\('x+\.\.\.\) abandoned at stop, still running", text)
    assert "1 done, 0 failed, 1 abandoned" in text


@pytest.mark.slow
def test_the_counts_add_up_when_the_helper_runs_out_of_time(tmp_path):
    env = python_env(DEFERRED_THREADS="4")
    with worker(tmp_path, APP, "--graceful-timeout", "2", env=env) as (proc, sock):
        client = Client(str(sock))
        for i in range(10):  # 10 x 4 calls of 0.4 s on 4 threads, every 2nd failing
            assert client.request(f"/work?n=4&s=0.4&fail=2&tag=r{i}").status == 200
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 3
    text = (tmp_path / "app.log").read_text()
    summary = re.search(r"(\d+) call\(s\) taken, (\d+) done, (\d+) failed, (\d+) abandoned", text)
    assert summary, text
    taken, done, failed, abandoned = map(int, summary.groups())
    assert taken == 40 and done + failed + abandoned == 40 and abandoned > 0 and failed > 0
    assert text.count("abandoned at stop") == abandoned
    assert text.count("RuntimeError: failing on purpose") == failed


class StallingSend:
    """The helper's socket, whose next send waits until the test lets it fail (the
    helper is gone by then)."""

    def __init__(self, sock, entered: threading.Event, release: threading.Event) -> None:
        self.sock, self.entered, self.release = sock, entered, release

    def send(self, data: bytes, flags: int = 0) -> int:
        self.entered.set()
        self.release.wait(30)
        raise BrokenPipeError("the helper is gone")

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def test_a_batch_sent_as_the_helper_dies_runs_in_the_worker_exactly_once(tmp_path, caplog):
    """The send and the helper's death are ordered: a batch whose send fails because the
    helper died meanwhile is the worker's to run, never also reported lost with it."""
    ran: list[str] = []
    executor = DeferredExecutor(process=True)
    executor.submit(Batch("GET /first", calls=[Call(note_pid)]))
    wait_for(lambda: executor.snapshot()["done"] == 1, what="the helper to run a call")
    helper = executor._helper
    entered, release = threading.Event(), threading.Event()
    helper.sock = StallingSend(helper.sock, entered, release)
    sender = threading.Thread(
        target=executor.submit, args=(Batch("GET /second", calls=[Call(ran.append, ("x",))]),)
    )
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        sender.start()
        assert entered.wait(10)
        os.kill(helper.pid, signal.SIGKILL)
        wait_for(lambda: "died" in caplog.text, what="the worker to see the helper die")
        release.set()  # the send fails now: the batch runs here
        sender.join(10)
        wait_for(lambda: ran == ["x"], what="the batch to run in the worker")
    assert "lost with helper" not in caplog.text
    stats = executor.snapshot()
    assert (stats["done"], stats["abandoned"], stats["registered"]) == (2, 0, 2)
    assert executor.drain(5) == 0
