"""Day one with `make`: start fails loudly and fast, or serves the app as an unprivileged
user, static files with their types, and logs that parse. Each test runs the Makefile
in its own copy of the checkout (Makefile and conf/, the same virtualenv) on free
ports, and always stops what it started."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT, free_port, require, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of the checkout under a folder other users may traverse (tmp_path is
    0700), so an unprivileged RUN_USER can reach its var/."""
    base = Path(tempfile.mkdtemp(prefix="fcgi-dayone-"))
    base.chmod(0o755)
    copy = base / "fcgi-finish"
    copy.mkdir()
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, copy / name)  # mtimes kept: the venv is up to date
    shutil.copytree(ROOT / "conf", copy / "conf")
    for venv in ROOT.glob(".venv*"):
        (copy / venv.name).symlink_to(venv)
    try:
        yield copy
    finally:
        make(copy, "stop")
        wait_for(lambda: not (copy / "var/run/supervisord.pid").exists(), 60, "the stop")
        shutil.rmtree(base)


def make(copy: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args],
        cwd=copy,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.contextmanager
def traversable(*paths: Path) -> Iterator[None]:
    """Let other users traverse the folders above ``paths`` (o+x) for the test, then
    put their modes back: here the venv's python lives under /root (0700)."""
    changed: list[tuple[Path, int]] = []
    for path in paths:
        for folder in Path(os.path.realpath(path)).parents:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                changed.append((folder, mode))
                folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for folder, mode in changed:
            folder.chmod(stat.S_IMODE(mode))


def pythons(checkout: Path) -> list[Path]:
    """The pythons of every virtualenv the checkout has (``make PYTHON=python3.13 test``
    uses .venv-python3.13, whose interpreter may live under /root)."""
    return [venv / "bin" / "python" for venv in sorted(checkout.glob(".venv*"))]


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_make_start_fails_fast_naming_the_taken_port_or_the_apps_traceback(checkout):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = make(checkout, "start", f"NGINX_LISTEN=127.0.0.1:{port}", "RUN_USER=root")
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and "another program is listening" in result.stderr
    assert "fcgi-finish on" not in result.stdout
    assert not (checkout / "var/run/supervisord.pid").exists()

    (checkout / "brokenapp.py").write_text(
        "import json\n\nSETTINGS = json.loads('{\"DEBUG\": tru}')\n"
    )
    # The traceback must reach the terminal within 5 s of `make start`; stopping what
    # it started takes a moment more.
    proc = subprocess.Popen(
        [
            "make",
            "-s",
            "start",
            f"NGINX_LISTEN=127.0.0.1:{free_port()}",
            "RUN_USER=root",
            "APP=brokenapp:application",
            f"FCGI_CHDIR={checkout}",
        ],
        cwd=checkout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if "Traceback (most recent call last)" in line:
            break
    took = time.monotonic() - started
    seen += proc.stderr.read()  # not communicate(): it would skip what readline buffered
    assert proc.stdout is not None
    result = subprocess.CompletedProcess(proc.args, proc.wait(60), proc.stdout.read(), seen)
    proc.stdout.close()
    proc.stderr.close()
    assert result.returncode != 0 and took < 5, (took, result.stderr)
    assert "fcgi-finish on" not in result.stdout
    for text in (result.stderr, (checkout / "var/log/app_00.log").read_text()):
        assert "importing 'brokenapp' raised JSONDecodeError" in text
        assert "Traceback (most recent call last):" in text
        assert 'brokenapp.py", line 3, in <module>' in text
    assert not (checkout / "var/run/supervisord.pid").exists()  # stopped what it started


def test_make_start_as_root_runs_unprivileged_with_static_files_and_json_logs(checkout):
    assert os.geteuid() == 0, "the tests run as root"
    static = checkout / "site-static"
    (static / "css").mkdir(parents=True)
    (static / "css" / "site.css").write_text("body { color: #333 }\n")
    port = free_port()
    settings = [
        f"NGINX_LISTEN=127.0.0.1:{port}",
        "APP=tests.apps_dayone:dayone",
        f"STATIC_DIR={static}",
    ]
    env = {
        "FCGI_PYTHONPATH": str(ROOT),
        "FCGI_LOG_FORMAT": "json",
        "FCGI_ACCESS_LOG_FORMAT": "json",
    }
    with traversable(*pythons(checkout), ROOT / "tests" / "apps_dayone.py"):
        result = make(checkout, "start", *settings, **env)
        assert result.returncode == 0, result.stderr
        assert f"fcgi-finish on http://127.0.0.1:{port}/ with 2 worker(s)" in result.stdout

        status, _, body = get(port, "/whoami")
        assert status == 200 and body.startswith(b"uid=")
        uid = int(body.split()[0].removeprefix(b"uid="))
        assert uid != 0 and uid == _uid("www-data")

        status, headers, body = get(port, "/static/css/site.css")
        assert status == 200 and body == b"body { color: #333 }\n"
        assert headers["content-type"] == "text/css"

        assert get(port, "/boom")[0] == 500
        shown = make(checkout, "status", *settings)
        assert "accepted conn:" in shown.stdout and "total processes:      2" in shown.stdout

        # nginx's workers are unprivileged too
        master = int((checkout / "var/run/nginx.pid").read_text())
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        assert children and all(_proc_uid(int(pid)) == uid for pid in children)

        access = checkout / "var/log/access.log"
        wait_for(lambda: len(access.read_text().splitlines()) >= 3, 10, "three access lines")

        # Another server on the stack's port: `make status` must not show its page.
        ctl = [
            str(checkout / ".venv/bin/supervisorctl"),
            "-c",
            str(checkout / "conf/supervisord.conf"),
        ]
        subprocess.run([*ctl, "stop", "nginx"], capture_output=True, timeout=60, check=True)
        with _other_server(port):
            shown = make(checkout, "status", *settings)
        assert "Not this stack" not in shown.stdout and "pool:" not in shown.stdout
        assert "another server does" in shown.stdout
        result = make(checkout, "stop")
        assert result.returncode == 0, result.stderr

    lines = [json.loads(line) for line in access.read_text().splitlines()]
    (boom,) = [ln for ln in lines if ln.get("uri") == "/boom"]
    assert boom["status"] == 500
    worker_lines = [
        json.loads(line)
        for log in sorted((checkout / "var/log").glob("app_*.log"))
        for line in log.read_text().splitlines()
    ]
    (error,) = [ln for ln in worker_lines if ln["level"] == "ERROR"]
    assert error["request_id"] == boom["id"] and "RuntimeError" in error["exception"]
    assert any(ln["message"].startswith("serving on") for ln in worker_lines)


@contextlib.contextmanager
def _other_server(port: int) -> Iterator[None]:
    """Some other web server on ``port``, answering 404 to everything."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404, "Not this stack")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def test_the_systemd_unit_is_rendered_for_this_checkout_and_verifies(checkout):
    analyze = require("systemd-analyze", "systemd")
    with traversable(*pythons(checkout)):
        result = make(checkout, "service", "RUN_USER=www-data", "APP=mysite.wsgi:application")
    assert result.returncode == 0, result.stderr
    unit = checkout / "var/run/fcgi-finish.service"
    text = unit.read_text()
    assert "@" not in text.replace("file://", "")  # every placeholder filled
    assert f"ExecStart={checkout}/.venv/bin/supervisord --nodaemon" in text
    assert "Environment=APP=mysite.wsgi:application" in text
    assert "Environment=FCGI_USER=www-data" in text
    verify = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
