"""The shipped stack as users run it: supervisord with the worker pool and nginx."""

from __future__ import annotations

import threading
import time

import pytest

from tests.procs import HTTP, fcgi_finish, free_port, stack, wait_for
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


def test_commands_talk_to_what_runs_after_the_saved_settings_change(tmp_path):
    """`config` and `service` change the saved settings of a running stack: status and
    reload still reach it where it listens, say what differs, and nothing it runs (the
    files in run/) changes until a restart, which applies them."""
    var = tmp_path / "var"
    with stack(tmp_path, numprocs=1) as (port, _ctl):
        other = free_port()
        ff = ("--state-dir", str(var))
        changed = fcgi_finish("config", *ff, "--listen", f"127.0.0.1:{other}")
        assert changed.returncode == 0, changed.stderr
        rendered = {p.name: p.read_bytes() for p in (var / "run").glob("*.conf")}
        assert set(rendered) == {"nginx.conf", "supervisord.conf"}
        unit = fcgi_finish("service", *ff, "--workers", "2")
        assert unit.returncode == 0, unit.stderr
        assert {p.name: p.read_bytes() for p in (var / "run").glob("*.conf")} == rendered

        note = (
            f"saved settings differ from the running stack's: NUMPROCS=2 (running: 1), "
            f"NGINX_LISTEN=127.0.0.1:{other} (running: 127.0.0.1:{port}); `fcgi-finish "
            "restart` (make restart) applies them"
        )
        status = fcgi_finish("status", *ff)
        assert status.returncode == 0, status.stdout
        assert "nothing answers" not in status.stdout
        assert "total processes:      1" in status.stdout and note in status.stdout
        assert note in unit.stdout
        reloaded = fcgi_finish("reload", *ff)
        assert reloaded.returncode == 0, reloaded.stderr
        assert "app:app_00" in reloaded.stdout and note in reloaded.stdout

        restarted = fcgi_finish("restart", *ff)
        assert restarted.returncode == 0, restarted.stderr
        assert f"on http://127.0.0.1:{other}/ with 2 worker(s)" in restarted.stdout
        status = fcgi_finish("status", *ff)
        assert status.returncode == 0 and "total processes:      2" in status.stdout
        assert "saved settings differ" not in status.stdout
