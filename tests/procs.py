"""Start the real programs the end-to-end tests talk to, and always stop them.

Each helper is a context manager: it starts the process on free ports under
the test's temporary directory, waits until it answers, and on exit stops it
and checks it is gone.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll ``condition`` until it returns something true; fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def lines(path: Path) -> list[str]:
    """The lines of a file a test's app writes, none while it does not exist yet."""
    return path.read_text().splitlines() if path.exists() else []


def connectable(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.connect(address)
        except OSError:
            return False
        return True


def serving(address: str) -> bool:
    """The worker at the unix socket ``address`` answers FCGI_GET_VALUES: its loop runs
    (a connect alone succeeds as soon as the socket exists, before the app is loaded)."""
    name = b"FCGI_MAX_CONNS"
    content = bytes([len(name), 0]) + name
    query = struct.pack("!BBHHBx", 1, 9, 0, len(content), 0) + content  # FCGI_GET_VALUES
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
            s.sendall(query)
            return len(s.recv(8)) > 0
        except OSError:
            return False


def require(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(
            f"{program} is not installed: run `make install` "
            f"(as root it runs apt-get install -y {package})"
        )
    return path


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{proc.args[:3]} did not stop within {timeout} s of signal {sig}")
    return proc.returncode


class HTTP:
    """Keep-alive HTTP/1.1 to 127.0.0.1:port; ``get`` returns (response, body, seconds)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(self, path: str, method: str = "GET", body: bytes | None = None):
        started = time.monotonic()
        self.conn.request(method, path, body=body)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp, data, time.monotonic() - started

    def __enter__(self) -> HTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def this_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


@contextlib.contextmanager
def running(
    cmd: list[str],
    log: Path,
    ready: Callable[[], object],
    what: str,
    sig: int = signal.SIGTERM,
    **popen,
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` with its output appended to ``log``; yield once ``ready()`` holds;
    on exit stop it with ``sig`` (and fail the test if it will not stop)."""
    out = open(log, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        wait_for(lambda: proc.poll() is not None or ready(), 20, what)
        if proc.poll() is not None:
            pytest.fail(f"{what}: exited {proc.returncode}: {log.read_text()}")
        yield proc
    finally:
        stop(proc, sig)
        out.close()


@contextlib.contextmanager
def worker(
    tmp: Path,
    app: str,
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "app",
    cwd: Path = ROOT,
    until: Callable[[str], bool] | None = None,
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``python -m fcgi`` on a unix socket in ``tmp``; yields the process and socket path
    once it serves (or once ``until(socket path)`` holds: ``connectable`` to act while the
    app still loads).
    ``python -m`` imports ``fcgi`` from ``cwd`` first."""
    sock = tmp / f"{name}.sock"
    cmd = [sys.executable, "-m", "fcgi", "--bind", f"unix:{sock}", *args, app]
    with running(
        cmd,
        tmp / f"{name}.log",
        lambda: (until or serving)(str(sock)),
        f"worker on {sock}",
        cwd=cwd,
        env=env or python_env(),
    ) as proc:
        yield proc, sock


def render(template: str | Path, listen: str, socket_path: Path, var: Path, **extra: str) -> str:
    """A shipped web server config (a name in the package's templates, or a file in
    conf/), filled in by fcgi_finish.render as the stack fills its own."""
    from fcgi_finish import render as rendering

    text = (
        Path(template).read_text() if isinstance(template, Path) else rendering.template(template)
    )
    for sub in ("run", "log", "tmp"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    values = rendering.web_server_values(listen, socket_path, var)
    return rendering.render(text, {**values, **extra})


def nginx_command(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with ``conf``, its files and error log under ``prefix``."""
    return [
        require("nginx", "nginx-light"),
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "var" / "log" / "nginx-error.log"),
        "-g",
        "daemon off;",
    ]


@contextlib.contextmanager
def nginx(
    tmp: Path, socket_path: Path, edit: Callable[[str], str] = str, **values: str
) -> Iterator[int]:
    """Real nginx with the shipped nginx.conf template (its placeholders filled, some
    from ``values``, then passed through ``edit``), on a free port; yields the port."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    var = tmp / "var"
    conf = tmp / "nginx.conf"
    conf.write_text(edit(render("nginx.conf", f"127.0.0.1:{port}", socket_path, var, **values)))
    with running_nginx(tmp, conf, port):
        yield port


def running_nginx(tmp: Path, conf: Path, port: int) -> contextlib.AbstractContextManager:
    """nginx in the foreground with ``conf`` (listening on ``port``), files under ``tmp``."""
    return running(
        nginx_command(tmp, conf),
        tmp / "nginx.out",
        lambda: connectable(("127.0.0.1", port)),
        f"nginx on port {port}",
    )


def fcgi_finish(*args: str, env: dict[str, str] | None = None, **kwargs):
    """Run ``fcgi-finish ARGS`` (this virtualenv's) to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "fcgi_finish", *args],
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=180,
        **kwargs,
    )


def stack_pids(var: Path) -> set[int]:
    """supervisord's pid and those of every program it runs (from its XML-RPC)."""
    from fcgi_finish.supervisor import Supervisor

    sup = Supervisor(var)
    pids = {sup.pid() or 0} | {p.pid for p in sup.processes() if p.pid}
    return pids - {0}


def left_running(pids: set[int]) -> list[int]:
    from fcgi_finish.supervisor import alive

    return sorted(pid for pid in pids if alive(pid))


@contextlib.contextmanager
def stack(
    tmp: Path, numprocs: int = 2, *settings: str, **env_extra: str
) -> Iterator[tuple[int, Callable[..., str]]]:
    """The shipped stack (supervisord, the pool, nginx) started by ``fcgi-finish start``
    with its state in ``tmp/var``, as the workers' own user (this one).

    Yields nginx's port and ``ctl(*args)``, which runs supervisorctl against it.
    On exit it stops the stack and checks that none of its processes is left.
    """
    var = tmp / "var"
    port = free_port()
    env = dict(os.environ, **env_extra)
    result = fcgi_finish(
        "start",
        "--state-dir",
        str(var),
        f"NGINX_LISTEN=127.0.0.1:{port}",
        f"NUMPROCS={numprocs}",
        f"RUN_USER={this_user()}",
        *settings,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    conf = str(var / "run" / "supervisord.conf")
    bindir = Path(sys.executable).parent

    def ctl(*args: str) -> str:
        return subprocess.run(
            [str(bindir / "supervisorctl"), "-c", conf, *args],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

    pids = stack_pids(var)
    try:
        yield port, ctl
        pids |= stack_pids(var)
    finally:
        stopped = fcgi_finish("stop", "--state-dir", str(var))
        assert stopped.returncode == 0, stopped.stderr
    left = left_running(pids)
    assert not left, f"processes left behind: {left}"
    # a worker that failed on its own (exit status 1: a traceback, a fault of the worker;
    # or a signal's default action) fails whichever test it happened in, with the
    # workers' logs that say why; a SIGKILL is a test's own
    supervisord = (var / "log" / "supervisord.log").read_text()
    failed = re.search(
        r"(?:exited|stopped): app_\d+ \((?:exit status 1\b|terminated by SIG(?!KILL))",
        supervisord,
    )
    assert not failed, worker_logs(var)


def worker_exits(var: Path) -> str:
    """'' if supervisord saw no worker of the stack at ``var`` exit; otherwise
    ``worker_logs``, which say why it exited."""
    if "exited: app_" not in (var / "log" / "supervisord.log").read_text():
        return ""
    return worker_logs(var)


def worker_logs(var: Path) -> str:
    """supervisord's log of the stack at ``var`` and each worker's (the last 150 lines)."""
    logs = var / "log"
    parts = [(logs / "supervisord.log").read_text()]
    for path in sorted(logs.glob("app_*.log*")):
        parts.append(f"--- {path.name}:\n" + "\n".join(lines(path)[-150:]))
    return "\n".join(parts)


# name: (binary, Debian package, conf template, command line after the binary)
WEB_SERVERS = {
    "apache": ("apache2", "apache2", "apache-fcgi.conf", ["-f", "{conf}", "-DFOREGROUND"]),
    "lighttpd": ("lighttpd", "lighttpd", "lighttpd.conf", ["-D", "-f", "{conf}"]),
    "caddy": (
        "caddy",
        "caddy",
        "Caddyfile",
        ["run", "--config", "{conf}", "--adapter", "caddyfile"],
    ),
}


@contextlib.contextmanager
def web_server(
    name: str, tmp: Path, socket_path: Path, edit: Callable[[str], str] = str
) -> Iterator[int]:
    """Apache, lighttpd, Caddy or HAProxy with its shipped conf/ template (passed through
    ``edit``), on a free port."""
    program, package, template, args = WEB_SERVERS[name]
    binary = require(program, package)
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / template
    rendered = render(ROOT / "conf" / template, f"127.0.0.1:{port}", socket_path, tmp / "var")
    conf.write_text(edit(rendered))
    env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp), XDG_DATA_HOME=str(tmp))
    cmd = [binary, *(a.format(conf=conf) for a in args)]
    with running(
        cmd,
        tmp / f"{name}.out",
        lambda: connectable(("127.0.0.1", port)),
        f"{name} on port {port}",
        env=env,
    ):
        yield port


def fcgi_command(*args: str) -> list[str]:
    """The worker's command line, ``python -m fcgi ARGS``, as every test spells it."""
    return [sys.executable, "-m", "fcgi", *args]


def run_fcgi(
    *args: str, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run the worker to its end (a usage error, --help) and capture its text output."""
    return subprocess.run(
        fcgi_command(*args),
        cwd=ROOT,
        env=env or python_env(),
        capture_output=True,
        text=True,
        timeout=30,
        **kwargs,
    )


# HAProxy's fcgi-app, which multiplexes requests on one connection (tests/test_e2e_haproxy.py).
WEB_SERVERS["haproxy"] = ("haproxy", "haproxy", "haproxy.cfg", ["-db", "-f", "{conf}"])
