"""The middleware under real gunicorn (sync worker): no finish_request, still no waiting."""

from __future__ import annotations

import sys

import pytest

from tests.procs import HTTP, ROOT, connectable, free_port, python_env, running
from tests.test_e2e_nginx import done_lines

pytestmark = pytest.mark.e2e


def test_six_deferring_requests_answered_at_once_and_drained_on_stop(tmp_path):
    log = tmp_path / "work.log"
    port = free_port()
    env = python_env(TEST_APP_LOG=str(log), GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="1")
    cmd = [sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "tests.apps:deferring"]
    with running(
        cmd,
        tmp_path / "gunicorn.log",
        lambda: connectable(("127.0.0.1", port)),
        "gunicorn",
        cwd=ROOT,
        env=env,
    ):
        timings = []
        for i in range(6):
            with HTTP(port) as client:  # gunicorn's sync worker closes after each response
                resp, body, took = client.get(f"/?seconds=2&tag={i}")
            assert resp.status == 200 and body == f"deferred {i}\n".encode()
            timings.append(took)
        assert max(timings) < 0.1, timings
        assert len(done_lines(log)) < 6  # work still running when we stop...
    # ...and worker_exit's drain ran all of it before the worker went
    assert sorted(tag for _, tag, _ in done_lines(log)) == [str(i) for i in range(6)]
