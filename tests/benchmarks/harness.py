"""Load generation and measurement: wrk runs, a fixed-rate latency probe, RSS."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import (
    ROOT,
    connectable,
    free_port,
    python_env,
    require,
    running,
    running_nginx,
)

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass
class Run:
    """One measurement: throughput, latency percentiles in ms, errors."""

    rps: float
    p50: float
    p99: float
    errors: int = 0
    mbps: float = 0.0
    samples: list[float] = field(default_factory=list)  # each latency, for pooled percentiles


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()
    return float(number) * _UNITS_MS[unit]


def wrk(
    url: str,
    seconds: float,
    connections: int = 16,
    script: str | None = None,
    env: dict[str, str] | None = None,
    threads: int = 1,
) -> Run:
    """Run wrk against ``url`` (``env``: variables its Lua script reads); non-2xx
    responses and socket errors count as errors."""
    cmd = [require("wrk", "wrk"), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s"]
    cmd.append("--latency")
    if script:
        cmd += ["-s", script]
    out = subprocess.run(
        [*cmd, url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
        p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    except (AttributeError, ValueError):
        raise RuntimeError(f"cannot read wrk's output for {url}:\n{out}") from None
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}[transfer.group(2)]
    return Run(rps, p50, p99, errors, float(transfer.group(1)) * scale)


def probe(port: int, path: str, rate: float, seconds: float) -> Run:
    """Requests at a fixed rate on one kept-alive connection; latency as the visitor sees it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: list[float] = []
    errors = 0
    start = time.monotonic()
    count = int(rate * seconds)
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        latencies.append((time.perf_counter() - sent) * 1000)
        errors += resp.status != 200
    conn.close()
    cuts = statistics.quantiles(latencies, n=100)
    return Run(count / (time.monotonic() - start), cuts[49], cuts[98], errors, 0.0, latencies)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, min, max."""
    return statistics.median(values), min(values), max(values)


@contextlib.contextmanager
def flup_server(tmp: Path, app: str) -> Iterator[Path]:
    """flup 1.0.3's threaded WSGIServer on a unix socket: the starting point."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "flup.sock"
    module, name = app.split(":")
    code = (
        f"from flup.server.fcgi import WSGIServer; from {module} import {name} as app; "
        f"WSGIServer(app, bindAddress={str(sock)!r}).run()"
    )
    with running(
        [sys.executable, "-c", code],
        tmp / "flup.log",
        lambda: connectable(str(sock)),
        "flup",
        cwd=ROOT,
        env=python_env(),
    ):
        yield sock


@contextlib.contextmanager
def http_proxy(tmp: Path, backend: str) -> Iterator[int]:
    """nginx proxy_pass in front of an HTTP server at ``backend`` (``127.0.0.1:PORT`` or
    ``unix:PATH``), keeping connections to it alive (HTTP/1.1, as fastcgi_keep_conn does
    for ours); yields nginx's port."""
    port = free_port()
    var = tmp / "var"
    for sub in ("log", "tmp", "run"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx-proxy.conf"
    conf.write_text(f"""
worker_processes 1;
pid {var}/run/nginx.pid;
error_log {var}/log/nginx-error.log warn;
{"user root root;" if os.getuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
    access_log {var}/log/nginx-access.log;
    client_body_temp_path {var}/tmp/body; proxy_temp_path {var}/tmp/proxy;
    fastcgi_temp_path {var}/tmp/fastcgi; uwsgi_temp_path {var}/tmp/uwsgi;
    scgi_temp_path {var}/tmp/scgi;
    client_max_body_size 100m;
    upstream backend {{ server {backend}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    with running_nginx(tmp, conf, port):
        yield port


@contextlib.contextmanager
def gunicorn_behind_nginx(tmp: Path, app: str, workers: int = 1) -> Iterator[tuple[int, int]]:
    """gunicorn sync workers, with nginx proxy_pass in front; yields (nginx port, master pid)."""
    tmp.mkdir(parents=True, exist_ok=True)
    gport = free_port()
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        str(workers),
        "-k",
        "sync",
        "-b",
        f"127.0.0.1:{gport}",
        "--log-level",
        "warning",
        app,
    ]
    with (
        running(
            gunicorn,
            tmp / "gunicorn.log",
            lambda: connectable(("127.0.0.1", gport)),
            "gunicorn",
            cwd=ROOT,
            env=python_env(),
        ) as gun,
        http_proxy(tmp, f"127.0.0.1:{gport}") as port,
    ):
        yield port, gun.pid


@contextlib.contextmanager
def granian_behind_nginx(tmp: Path, app: str) -> Iterator[tuple[int, int]]:
    """Granian (Rust) serving WSGI on a unix socket, one worker process, its default
    threads, with nginx proxy_pass in front; yields (nginx port, Granian's pid)."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "granian.sock"
    cmd = [
        str(Path(sys.executable).parent / "granian"),
        "--interface",
        "wsgi",
        "--workers",
        "1",
        "--http",
        "1",
        "--no-ws",
        "--uds",
        str(sock),
        "--log-level",
        "warning",
        app,
    ]
    with on_socket(cmd, tmp, "granian", sock) as proc, http_proxy(tmp, f"unix:{sock}") as port:
        yield port, proc.pid


@contextlib.contextmanager
def uwsgi_server(tmp: Path, app: str) -> Iterator[Path]:
    """uWSGI (C) serving FastCGI, one process, one thread: the ceiling for comparison."""
    tmp.mkdir(parents=True, exist_ok=True)
    binary = Path(sys.executable).parent / "uwsgi"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "uwsgi"], check=True)
    sock = tmp / "uwsgi.sock"
    cmd = [
        str(binary),
        "--fastcgi-socket",
        str(sock),
        "--module",
        app,
        "--processes",
        "1",
        "--threads",
        "1",
        "--master",
        "--disable-logging",
        "--chmod-socket=660",
        # a worker still in a request at the stop is killed after 5 s, not the default 60
        # (past the harness's 30 s: a bench run on a busy machine failed so at its end)
        "--worker-reload-mercy",
        "5",
        "--reload-mercy",
        "5",
    ]
    with on_socket(cmd, tmp, "uwsgi", sock):
        yield sock


def on_socket(cmd: list[str], tmp: Path, name: str, sock: Path):
    """A baseline server ``cmd`` from the checkout, ready once ``sock`` takes connections;
    stopped with SIGINT (its graceful stop)."""
    return running(
        cmd,
        tmp / f"{name}.log",
        lambda: connectable(str(sock)),
        name,
        signal.SIGINT,
        cwd=ROOT,
        env=python_env(),
    )


HELLO_PHP = '<?php header("Content-Type: text/plain"); echo "Hello world\\n";\n'


@contextlib.contextmanager
def php_fpm(tmp: Path) -> Iterator[tuple[Path, Path]]:
    """PHP-FPM 8.2 (Debian php8.2-fpm), one static child on a unix socket, serving a
    hello-world script: PHP's own answer to the same request. Yields (socket, script)."""
    tmp.mkdir(parents=True, exist_ok=True)
    binary = require("php-fpm8.2", "php8.2-fpm")
    sock, script = tmp / "php-fpm.sock", tmp / "hello.php"
    script.write_text(HELLO_PHP)
    user = "user = root\ngroup = root\n" if os.getuid() == 0 else ""
    conf = tmp / "php-fpm.conf"
    conf.write_text(
        f"[global]\npid = {tmp}/php-fpm.pid\nerror_log = {tmp}/php-fpm.log\n"
        "daemonize = no\n\n"
        f"[hello]\n{user}listen = {sock}\nlisten.mode = 0666\n"
        "pm = static\npm.max_children = 1\npm.max_requests = 0\n"
        "php_admin_value[opcache.enable] = 1\n"
    )
    cmd = [binary, "-F", "-y", str(conf), "-p", str(tmp), "-n", "-d", "opcache.enable=1"]
    if os.getuid() == 0:
        cmd.append("-R")
    with running(
        cmd, tmp / "php-fpm.out", lambda: connectable(str(sock)), "php-fpm", signal.SIGQUIT
    ):
        yield sock, script


def php_nginx_edit(script: Path):
    """The shipped nginx.conf, plus the SCRIPT_FILENAME PHP-FPM needs."""

    def edit(conf: str) -> str:
        return conf.replace(
            "fastcgi_keep_conn on;",
            f"fastcgi_keep_conn on;\n        fastcgi_param SCRIPT_FILENAME {script};",
            1,
        )

    return edit
