"""Through real nginx (fastcgi_keep_conn, upstream keepalive) to one real worker process."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.gate import Gate
from tests.procs import HTTP, nginx, python_env, wait_for, worker

pytestmark = pytest.mark.e2e


def done_lines(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines() if line.startswith("done")]


@pytest.mark.parametrize("app", ["tests.apps:deferring", "tests.apps:php_style"])
def test_six_requests_answered_at_once_on_one_kept_connection(tmp_path, app):
    log = tmp_path / "work.log"
    env = python_env(TEST_APP_LOG=str(log))
    with (
        worker(tmp_path, app, "--log-level", "debug", env=env) as (_proc, sock),
        nginx(tmp_path, sock) as port,
        HTTP(port) as client,
        Gate(tmp_path / "gate") as gate,
    ):
        for i in range(6):
            resp, body, _ = client.get(f"/?gate={gate.path}&tag={i}")
            assert resp.status == 200
            assert b"debug..." not in body
        # all six answered while the work of each was still held at the gate
        assert done_lines(log) == []
        gate.open()
        wait_for(lambda: len(done_lines(log)) == 6, 30, "all six deferred jobs")
        assert sorted(tag for _, tag, _ in done_lines(log)) == [str(i) for i in range(6)]
    # one connection from worker()'s readiness probe, then nginx's one kept-alive connection
    opened = (tmp_path / "app.log").read_text().count(": opened") - 1
    assert opened == 1, f"nginx opened {opened} upstream connections, expected one kept alive"


def test_more_clients_than_threads_each_get_their_own_response(tmp_path):
    with (
        worker(tmp_path, "tests.apps:echo", "--threads", "2") as (_proc, sock),
        nginx(tmp_path, sock) as port,
    ):
        results: dict[tuple[int, int], tuple[int, bool]] = {}

        def one_client(i: int) -> None:
            with HTTP(port) as client:
                for j in range(5):
                    payload = f"client {i} request {j} ".encode() * 50
                    resp, body, _ = client.get(f"/c{i}", method="POST", body=payload)
                    results[(i, j)] = (resp.status, body == payload)

        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 24 * 5
        assert set(results.values()) == {(200, True)}


def test_large_upload_and_download_intact(tmp_path):
    upload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    with (
        worker(tmp_path, "tests.apps:echo") as (_proc, sock),
        nginx(tmp_path / "up", sock) as port,
        HTTP(port) as client,
    ):
        resp, body, _ = client.get("/upload", method="POST", body=upload)
        assert resp.status == 200 and body == upload
    expected = bytes(range(256)) * (3_000_000 // 256) + bytes(3_000_000 % 256)
    with (
        worker(tmp_path, "tests.apps:download", name="dl") as (_proc, sock),
        nginx(tmp_path / "down", sock) as port,
        HTTP(port) as client,
    ):
        resp, body, _ = client.get("/?3000000")
        assert resp.status == 200 and body == expected


def test_root_mount_sees_the_whole_path(tmp_path):
    with (
        worker(tmp_path, "tests.apps:echo") as (_proc, sock),
        nginx(tmp_path, sock) as port,
        HTTP(port) as client,
    ):
        resp, _body, _ = client.get("/some/path?q=1")
        assert resp.getheader("X-Script-Name") == "[]"
        assert resp.getheader("X-Path-Info") == "[/some/path]"


def test_stock_fastcgi_params_still_give_the_root_app_the_whole_path(tmp_path):
    """nginx's own fastcgi_params puts the path in SCRIPT_NAME; the worker rejoins it."""
    stock = "include /etc/nginx/fastcgi_params;"

    def stock_params(text: str) -> str:
        text = text.replace('fastcgi_param SCRIPT_NAME       "";', stock)
        return text.replace("fastcgi_param PATH_INFO         $uri;", "")

    with (
        worker(tmp_path, "tests.apps:echo") as (_proc, sock),
        nginx(tmp_path, sock, edit=stock_params) as port,
        HTTP(port) as client,
    ):
        conf = (tmp_path / "nginx.conf").read_text()
        assert stock in conf and "fastcgi_param PATH_INFO" not in conf
        resp, _body, _ = client.get("/some/path")
        assert (resp.getheader("X-Script-Name"), resp.getheader("X-Path-Info")) == (
            "[]",
            "[/some/path]",
        )
