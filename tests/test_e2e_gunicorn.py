"""The middleware under real gunicorn (sync worker): no finish_request, still no waiting."""

from __future__ import annotations

import signal
import sys

import pytest

from tests.gate import Gate
from tests.procs import HTTP, ROOT, connectable, free_port, python_env, running
from tests.test_e2e_nginx import done_lines

pytestmark = pytest.mark.e2e


def test_six_deferring_requests_answered_at_once_and_drained_on_stop(tmp_path):
    log = tmp_path / "work.log"
    port = free_port()
    env = python_env(TEST_APP_LOG=str(log), GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="1")
    cmd = [sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "tests.apps:deferring"]
    with (
        running(
            cmd,
            tmp_path / "gunicorn.log",
            lambda: connectable(("127.0.0.1", port)),
            "gunicorn",
            cwd=ROOT,
            env=env,
        ) as proc,
        Gate(tmp_path / "gate") as gate,
    ):
        for i in range(6):
            with HTTP(port) as client:  # gunicorn's sync worker closes after each response
                resp, body, _ = client.get(f"/?gate={gate.path}&tag={i}")
            assert resp.status == 200 and body == f"deferred {i}\n".encode()
        # each answered while the work before it was still held at the gate
        assert done_lines(log) == []
        proc.send_signal(signal.SIGTERM)  # the stop begins with all six still running...
        gate.open()
        assert proc.wait(30) == 0
    # ...and worker_exit's drain ran all of it before the worker went
    assert sorted(tag for _, tag, _ in done_lines(log)) == [str(i) for i in range(6)]
