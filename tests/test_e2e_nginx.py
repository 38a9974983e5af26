"""Through real nginx (fastcgi_keep_conn, upstream keepalive) to one real worker process."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import resource
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from tests.gate import Gate
from tests.procs import (
    HTTP,
    connectable,
    free_port,
    nginx,
    nginx_command,
    python_env,
    require,
    running,
    wait_for,
    worker,
)

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


STOCK = "include /etc/nginx/fastcgi_params;"


def stock_params(text: str) -> str:
    """The shipped nginx.conf with nginx's own fastcgi_params in place of our two lines."""
    text = text.replace('fastcgi_param SCRIPT_NAME       "";', STOCK)
    return text.replace("fastcgi_param PATH_INFO         $uri;", "")


def test_stock_fastcgi_params_still_give_the_root_app_the_whole_path(tmp_path):
    """nginx's own fastcgi_params puts the path in SCRIPT_NAME; the worker rejoins it."""
    stock = STOCK

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


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            require("openssl", "openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _https_get(port: int, cafile: Path, headers: dict[str, str]) -> http.client.HTTPResponse:
    context = ssl.create_default_context(cafile=str(cafile))  # verified: the cert is ours
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", "/who", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp
    finally:
        conn.close()


@pytest.mark.slow
def test_https_through_nginx_and_the_client_behind_a_load_balancer(tmp_path):
    """The stack's nginx.conf (rendered from its configuration) with TLS_CERT/TLS_KEY and
    TRUSTED_PROXIES: the app sees https and, only from a trusted load balancer, the
    client's address and scheme it forwards."""
    from fcgi_finish import stack
    from fcgi_finish.config import load

    cert, key = _certificate(tmp_path)
    lb = "203.0.113.7"  # the visitor, as the load balancer forwards it
    forwarded = {"X-Forwarded-For": lb, "X-Forwarded-Proto": "https"}
    ports = {}
    state = tmp_path / "var"
    with worker(tmp_path, "tests.apps:router") as (_proc, sock):
        for trusted in ("127.0.0.1", "192.0.2.1"):
            var = state / trusted
            port = free_port()
            given = {
                "NGINX_LISTEN": f"127.0.0.1:{port}",
                "TLS_CERT": str(cert),
                "TLS_KEY": str(key),
                "TRUSTED_PROXIES": trusted,
                "RUN_USER": "root",
            }
            conf = stack.nginx_conf(load(var, given, environ={}))
            conf = conf.replace(f"unix:{var}/run/app.sock", f"unix:{sock}")
            for sub in ("run", "log", "tmp"):
                (var / sub).mkdir(parents=True, exist_ok=True)
            (var / "nginx.conf").write_text(conf)
            ports[trusted] = (var, port)
        with contextlib.ExitStack() as servers:
            for var, port in ports.values():
                servers.enter_context(
                    running(
                        nginx_command(var, var / "nginx.conf"),
                        var / "nginx.out",
                        lambda port=port: connectable(("127.0.0.1", port)),
                        f"nginx on {port}",
                    )
                )
            trusting = ports["127.0.0.1"][1]
            resp = _https_get(trusting, cert, {})  # a visitor straight to nginx
            assert (resp.getheader("X-Scheme"), resp.getheader("X-Remote-Addr")) == (
                "https",
                "127.0.0.1",
            )
            resp = _https_get(trusting, cert, forwarded)  # through the trusted balancer
            assert (resp.getheader("X-Scheme"), resp.getheader("X-Remote-Addr")) == ("https", lb)
            resp = _https_get(trusting, cert, {**forwarded, "X-Forwarded-Proto": "http"})
            assert resp.getheader("X-Scheme") == "http"  # it took plain HTTP from the visitor
            # nginx trusting another address: anyone's forwarded headers change nothing
            other = ports["192.0.2.1"][1]
            resp = _https_get(other, cert, {**forwarded, "X-Forwarded-Proto": "http"})
            assert (resp.getheader("X-Scheme"), resp.getheader("X-Remote-Addr")) == (
                "https",
                "127.0.0.1",
            )
            # plain HTTP to a TLS port is refused by nginx, never passed on
            with HTTP(trusting) as client:
                assert client.get("/who")[0].status == 400


def test_file_wrapper_sends_a_file_whole_and_closes_it_and_empty_params_are_left_out(
    tmp_path,
):
    """Through nginx's stock params: a 5 MB file through wsgi.file_wrapper arrives byte
    for byte, twice on one kept connection, the worker keeps no descriptor of it after,
    and a GET has no CONTENT_LENGTH key (the stock params send it empty)."""
    data = os.urandom(5 * 1024 * 1024 + 7)
    path = tmp_path / "five.bin"
    path.write_bytes(data)
    with (
        worker(tmp_path, "tests.apps_streams:app") as (proc, sock),
        nginx(tmp_path, sock, edit=stock_params) as port,
        HTTP(port) as client,
    ):
        for _ in range(2):
            resp, body, _ = client.get(f"/file?{path}")
            assert resp.status == 200 and len(body) == len(data)
            assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        fds = Path(f"/proc/{proc.pid}/fd")
        assert not [fd for fd in fds.iterdir() if os.readlink(fd) == str(path)]
        assert client.get("/environ")[1] == b"neither"
        body = client.get("/environ", "POST", b"abc")[1]
        assert body.startswith(b"CONTENT_LENGTH='3'")


@pytest.mark.slow
def test_five_thousand_never_used_connections_then_a_fresh_request_within_a_second(tmp_path):
    """Connections opened and never used (a client that connects and sends nothing) are
    evicted once their first-request grace ends, least recently used first, so a fresh
    request through nginx (a new upstream connection, behind them in the listen backlog)
    is answered within a second; the worker holds at most --max-connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 12000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 12000), hard))
    with (
        worker(tmp_path, "tests.apps:hello", "--max-connections", "4096") as (proc, sock),
        nginx(tmp_path, sock) as port,
    ):
        idle = []
        try:
            for _ in range(5000):
                client = socket.socket(socket.AF_UNIX)
                client.connect(str(sock))
                idle.append(client)
            # The worker holds its 4096 before nginx connects: the 904 others then fit
            # the backlog (1024), where nginx's connect waits; while the worker catches
            # up on a busy machine the backlog is full, and nginx's connect is refused.
            fds = f"/proc/{proc.pid}/fd"
            wait_for(lambda: len(os.listdir(fds)) >= 4096, 30, "the worker to hold 4096")
            with HTTP(port) as fresh:
                resp, body, took = fresh.get("/")
            assert (resp.status, body) == (200, b"Hello world\n")
            assert took < 1.0, f"a fresh request took {took:.2f} s"
            held = len(os.listdir(f"/proc/{proc.pid}/fd"))
            assert held < 4096 + 50  # the connections, and the worker's own few files
        finally:
            for client in idle:
                client.close()
