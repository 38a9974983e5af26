"""The status page side by side with PHP-FPM 8.2: the same kept-alive requests through a
FastCGI client to each, then the same field read from each status page."""

from __future__ import annotations

import json
import signal

import pytest

from tests.fcgi_client import Client
from tests.procs import connectable, require, running, worker

pytestmark = pytest.mark.e2e

N = 40  # requests, over two kept-alive connections, before the status request


def php_fpm(tmp_path):
    """PHP-FPM with its own config in ``tmp_path``: two static children, status at /status."""
    conf = tmp_path / "php-fpm.conf"
    conf.write_text(
        "[global]\n"
        f"pid = {tmp_path}/php-fpm.pid\n"
        f"error_log = {tmp_path}/php-fpm.log\n"
        "daemonize = no\n"
        "[www]\n"
        "user = root\n"  # with -R: the tests run as root
        "group = root\n"
        f"listen = {tmp_path}/php.sock\n"
        "pm = static\n"
        "pm.max_children = 2\n"  # a child per kept-alive connection
        "pm.status_path = /status\n"
    )
    (tmp_path / "hello.php").write_text('<?php echo "Hello world\\n";\n')
    binary = require("php-fpm8.2", "php8.2-fpm")
    sock = tmp_path / "php.sock"
    return running(
        [binary, "-R", "-F", "-y", str(conf), "-p", str(tmp_path)],
        tmp_path / "php-fpm.out",
        lambda: connectable(str(sock)),
        "php-fpm",
        sig=signal.SIGQUIT,  # PHP-FPM's graceful stop
    ), sock


def accepted_conn(sock, script: dict[str, str], status: dict[str, str]) -> list[int]:
    """``accepted conn`` after N requests, then after N more, over two kept-alive
    connections; each reading is one more request (the status request)."""
    clients = [Client(str(sock)), Client(str(sock))]
    readings = []
    for _ in range(2):
        for i in range(N):
            resp = clients[i % 2].request("/hello", extra=script)
            assert resp.body == b"Hello world\n"
        readings.append(json.loads(clients[0].request("/status", extra=status).body))
    for client in clients:
        client.close()
    return [data["accepted conn"] for data in readings]


def test_accepted_conn_counts_requests_as_php_fpm_does(tmp_path):
    (tmp_path / "php").mkdir()
    php, php_sock = php_fpm(tmp_path / "php")
    status = {"SCRIPT_NAME": "/status", "SCRIPT_FILENAME": "/status", "QUERY_STRING": "json"}
    with php:
        script = {"SCRIPT_NAME": "/hello.php", "SCRIPT_FILENAME": str(tmp_path / "php/hello.php")}
        theirs = accepted_conn(php_sock, script, status)
    with worker(tmp_path, "tests.apps:hello", "--status-path", "/status") as (_proc, sock):
        ours = accepted_conn(sock, {}, {"QUERY_STRING": "json", "PATH_INFO": "/status"})
    # Both count requests, the status request included, not connections (2 here):
    # N requests and one status request later, both have grown by N + 1.
    assert theirs[1] - theirs[0] == ours[1] - ours[0] == N + 1
    # Ours is exact from the start; PHP-FPM's reading also counts, in each idle child,
    # the request it is waiting for (at most one per child: 2 here).
    assert ours[0] == N + 1
    assert N + 1 <= theirs[0] <= N + 1 + 2
