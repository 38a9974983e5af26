"""Every way an app can go wrong, through real nginx, with and without DeferredMiddleware:
500 if nothing was sent, a cut response once something was, one log line with the
traceback and the request id, and the same worker process serving the next request."""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path

import pytest

from tests import apps_faults
from tests.procs import nginx, wait_for, worker

pytestmark = pytest.mark.e2e

VARIANTS = {"bare": "tests.apps_faults:faults", "deferred": "tests.apps_faults:faults_deferred"}


class Stack:
    def __init__(self, proc, port: int, log: Path, nginx_log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.nginx_log = nginx_log


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """One worker and one nginx per variant, shared by every case."""
    with contextlib.ExitStack() as es:
        found = {}
        for name, app in VARIANTS.items():
            tmp = tmp_path_factory.mktemp(name)
            proc, sock = es.enter_context(worker(tmp, app, "--threads", "2"))
            port = es.enter_context(nginx(tmp, sock))
            found[name] = Stack(proc, port, tmp / "app.log", tmp / "var/log/nginx-error.log")
        yield found


def http_get(port: int, path: str) -> bytes:
    """One HTTP/1.1 request on a fresh connection, read to EOF. A response the worker
    leaves hanging (nginx would wait 60 s, its fastcgi_read_timeout) times out here."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def log_lines(stack: Stack, case: str) -> list[str]:
    return [ln for ln in stack.log.read_text().splitlines() if f"(GET /{case})" in ln]


def serves_on(stack: Stack, pid: int) -> None:
    data = http_get(stack.port, "/ok")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n")
    assert stack.proc.poll() is None and stack.proc.pid == pid


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(apps_faults.BEFORE))
def test_fault_before_anything_is_sent_is_a_500(stacks, variant, case):
    stack = stacks[variant]
    pid = stack.proc.pid
    data = http_get(stack.port, f"/{case}")
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 500 "), data[:200]
    assert b"injected" not in head.lower()
    assert b"Internal Server Error" in data
    lines = wait_for(lambda: log_lines(stack, case), 5, "the error's log line")
    assert len(lines) == 1, lines
    assert re.search(rf"ERROR fcgi: request {pid}-\d+ \(GET /{case}\)", lines[0]), lines[0]
    if case != "no_start_response":
        text = stack.log.read_text()
        after = text[text.index(lines[0]) + len(lines[0]) :]
        assert after.lstrip("\n").startswith("Traceback"), after[:300]
    serves_on(stack, pid)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(apps_faults.AFTER))
def test_fault_after_the_headers_cuts_the_response(stacks, variant, case):
    stack = stacks[variant]
    pid = stack.proc.pid
    data = http_get(stack.port, f"/{case}")
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")  # the chunked body never ends: not complete
    wait_for(
        lambda: (
            "upstream prematurely closed" in stack.nginx_log.read_text() and log_lines(stack, case)
        ),
        5,
        "nginx to see the cut",
    )
    lines = log_lines(stack, case)
    assert len(lines) == 1 and "connection cut" in lines[0], lines
    assert re.search(rf"request {pid}-\d+ \(GET /{case}\)", lines[0])
    serves_on(stack, pid)
