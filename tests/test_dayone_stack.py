"""Day one with `make`: a fresh clone runs a user's own project, configured once. Each
test runs the Makefile in its own copy of the checkout (Makefile and conf/, the same
virtualenv) on free ports, and always stops what it started."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import django_project
from tests.procs import ROOT, free_port, left_running, require, stack_pids, stop, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of the checkout under a folder other users may traverse (tmp_path is
    0700), so an unprivileged RUN_USER can reach its var/; its virtualenv is the
    checkout's own, linked (so under /root it stays out of their reach)."""
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
        shutil.rmtree(base)


def make(copy: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args],
        cwd=copy,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_make_start_fails_fast_naming_the_mistake_with_nothing_left_running(checkout):
    for words, expected in (
        (["FCGI_THEADS=4"], ["FCGI_THEADS", "did you mean FCGI_THREADS?"]),
        (["FCGI_THREADS=abc"], ["FCGI_THREADS='abc' (--threads)", "'abc' is not a whole number"]),
        (["NUMPROCS=abc"], ["NUMPROCS='abc'", "expected N"]),
    ):
        result = make(checkout, "start", *words)
        assert result.returncode != 0
        assert all(part in result.stderr for part in expected), result.stderr
        assert "does not load" not in result.stderr and "usage:" not in result.stderr
    assert not (checkout / "var/run").exists()
    # A setting given to a command that does not start the stack is refused, though make
    # hands it over in the environment as well as on the command line.
    result = make(checkout, "status", "FCGI_THREADS=4")
    assert result.returncode != 0 and "make restart FCGI_THREADS=4" in result.stderr

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


def _django_project(folder: Path) -> None:
    """A project as startproject and `migrate` as root leave it, with static files."""
    django_project.write(folder, sqlite=True)
    (folder / "static" / "css").mkdir(parents=True)
    (folder / "static" / "css" / "site.css").write_text("body { color: #333 }\n")


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


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


def test_a_django_project_from_make_start_to_the_systemd_unit(checkout):
    """A user's session: `make start` with their project, kept for every later target:
    status, a bare restart, a refused and a good reload, config, the unit, stop."""
    assert os.geteuid() == 0, "the tests run as root"
    project = checkout.parent / "mysite"
    _django_project(project)
    port = free_port()
    var = checkout / "var"
    result = make(
        checkout,
        "start",
        "APP=mysite.wsgi:application",
        f"FCGI_CHDIR={project}",
        f"NGINX_LISTEN=127.0.0.1:{port}",
        f"STATIC_DIR={project / 'static'}",
        "FCGI_RELOAD_CHECK_PATH=/hello",
        "FCGI_LOG_FORMAT=json",
        "FCGI_ACCESS_LOG_FORMAT=json",
    )
    # Started as root, the workers run as www-data: here they cannot write the database
    # migrate left, and where the checkout is under /root (0700) they cannot reach its
    # virtualenv either. Each is named with its fix, before anything starts.
    assert result.returncode != 0 and not (var / "run/supervisord.pid").exists()
    if "cannot reach" in result.stderr:
        assert "closed to other users: /root" in result.stderr or "(mode 700)" in result.stderr
        assert "chmod o+x" in result.stderr and "RUN_USER=root" in result.stderr
        user, fix = "root", ["RUN_USER=root"]  # the fix it names, the rest kept
    else:
        assert f"cannot write {project / 'db.sqlite3'} (owner root, mode 644)" in result.stderr
        assert f"chown www-data {project / 'db.sqlite3'} {project}" in result.stderr
        shutil.chown(project / "db.sqlite3", "www-data")
        shutil.chown(project, "www-data")
        user, fix = "www-data", []
    result = make(checkout, "start", *fix)
    assert result.returncode == 0, result.stderr
    assert f"on http://127.0.0.1:{port}/ with 2 worker(s) of mysite.wsgi" in result.stdout
    assert get(port, "/hello")[2] == b"v1"
    uid = int(get(port, "/whoami")[2].removeprefix(b"uid="))
    assert uid == int(subprocess.check_output(["id", "-u", user]))
    status, headers, body = get(port, "/static/css/site.css")
    assert status == 200 and body == b"body { color: #333 }\n"
    assert headers["content-type"] == "text/css"
    master = int((var / "run/nginx.pid").read_text())  # nginx's workers run as the user too
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert children and all(_proc_uid(int(pid)) == uid for pid in children)

    shown = make(checkout, "status")
    assert shown.returncode == 0, shown.stdout
    assert "STARTING" not in shown.stdout and "celery" not in shown.stdout
    assert "total processes:      2" in shown.stdout and "max children reached: 0" in shown.stdout

    # A bare restart serves the same app on the same port.
    assert make(checkout, "restart").returncode == 0
    assert get(port, "/hello")[2] == b"v1"
    config = make(checkout, "config").stdout
    assert re.search(r"^APP=mysite.wsgi:application +# .*fcgi-finish.env:\d+$", config, re.M)
    assert re.search(r"^NUMPROCS=2 +# default$", config, re.M)

    # A broken views.py passes an import (Django imports views lazily), not the check.
    django_project.views(project, "v2", broken=True)
    result = make(checkout, "reload")
    assert result.returncode != 0
    assert "refused the new code" in result.stderr and "GET /hello raised" in result.stderr
    assert "No module named 'no_such_module'" in result.stderr
    assert get(port, "/hello")[2] == b"v1"
    django_project.views(project, "v3")
    result = make(checkout, "reload")
    assert result.returncode == 0, result.stderr
    assert get(port, "/hello")[2] == b"v3"

    # Another server on the stack's port: `make status` must not show its page.
    ctl = [str(checkout / ".venv/bin/supervisorctl"), "-c", str(var / "run/supervisord.conf")]
    subprocess.run([*ctl, "stop", "nginx"], capture_output=True, timeout=60, check=True)
    with _other_server(port):
        shown = make(checkout, "status")
    assert "Not this stack" not in shown.stdout and "pool:" not in shown.stdout
    assert "another server does" in shown.stdout

    result = make(checkout, "service")
    assert result.returncode == 0, result.stderr
    unit = var / "fcgi-finish.service"
    assert result.stdout.splitlines()[0] == str(unit)
    pids = stack_pids(var)
    assert make(checkout, "stop").returncode == 0
    assert not left_running(pids)
    _check_unit_serves(unit, port, var)

    access = [json.loads(ln) for ln in (var / "log/access.log").read_text().splitlines()]
    assert {ln["status"] for ln in access if ln["uri"] == "/hello"} == {200}
    worker_lines = [
        json.loads(line)
        for log in sorted((var / "log").glob("app_*.log"))
        for line in log.read_text().splitlines()
    ]
    assert any(ln["message"].startswith("serving on") for ln in worker_lines)


def _check_unit_serves(unit: Path, port: int, var: Path) -> None:
    """The unit verifies, names nothing but its configuration file, and its ExecStart
    started with its own EnvironmentFile and WorkingDirectory serves the app."""
    text = unit.read_text()
    verify = subprocess.run(
        [require("systemd-analyze", "systemd"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    fields = dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w+=", line))
    assert fields["EnvironmentFile"] == str(var / "fcgi-finish.env")
    assert fields["ExecStart"].endswith(f"fcgi-finish run --state-dir {var}")
    assert "APP" not in text.replace("fcgi-finish", "")  # the settings are not repeated
    # As systemd starts it: a bare environment, the file's variables, the folder.
    script = 'set -a; . "$1"; shift; exec "$@"'
    proc = subprocess.Popen(
        ["sh", "-c", script, "sh", fields["EnvironmentFile"], *fields["ExecStart"].split()],
        cwd=fields["WorkingDirectory"],
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: set[int] = set()
    try:
        wait_for(lambda: _answers(port) == b"v3", 60, "the unit's stack")
        pids = stack_pids(var)
    finally:
        stop(proc, signal.SIGTERM, 90)
    assert not left_running(pids)


def _answers(port: int) -> bytes | None:
    try:
        return get(port, "/hello")[2]
    except OSError:
        return None
