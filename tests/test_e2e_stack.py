"""The shipped stack as users run it: supervisord with the worker pool and nginx."""

from __future__ import annotations

import threading
import time

import pytest

from tests.procs import HTTP, stack, wait_for
from wsgi_app.demo.client import read_events

pytestmark = pytest.mark.e2e


def test_seed_experiment_restart_under_load_and_clean_stop(tmp_path):
    with stack(tmp_path, numprocs=2) as (port, ctl):
        # The seed experiment, sleeps shortened: the page first, the log lines after.
        with HTTP(port) as client:
            resp, body, waited = client.get("/demo?pause=0.5&work=1")
        answered = time.time()
        assert resp.status == 200 and body == b"program start...\n"
        assert waited < 0.5
        demo_id = resp.getheader("X-Demo-Id")
        log = tmp_path / "var" / "log" / "demo.log"
        wait_for(lambda: "end-time" in read_events(log, demo_id), 20, "end-time in demo.log")
        events = read_events(log, demo_id)
        assert events["start-time"] < answered < events["start-proceed"] < events["end-time"]
        assert events["end-time"] - events["start-time"] >= 1.5

        # Restart one worker while requests flow: none may fail.
        statuses: list[int] = []
        stop_flag = threading.Event()

        def load() -> None:
            with HTTP(port) as client:
                while not stop_flag.is_set():
                    statuses.append(client.get("/ping")[0].status)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) > 50, 10, "requests to flow")
        assert "app:app_00: started" in ctl("restart", "app:app_00")
        count = len(statuses)
        wait_for(lambda: len(statuses) > count + 50, 10, "requests after the restart")
        stop_flag.set()
        for t in threads:
            t.join(10)
        assert set(statuses) == {200}, f"{len(statuses)} requests, statuses {set(statuses)}"
