"""The stack from a pip install, as a user of their own virtualenv runs it: a fresh
virtualenv, ``pip install CHECKOUT`` (not editable: the templates must come in the
wheel), then from the app's folder ``fcgi-finish start``, ``status``, a bare
``restart``, ``reload`` of changed and of broken code, ``stop``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, free_port, left_running, stack_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP = """
import os

VERSION = "{version}"


def app(environ, start_response):
    if environ["PATH_INFO"] == "/whoami":
        body = f"uid={{os.getuid()}}"
    else:
        body = VERSION
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
"""


def _install(base: Path) -> Path:
    """A fresh virtualenv with the checkout pip-installed into it; its bin folder."""
    source = base / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("fcgi", "wsgi_app", "fcgi_finish"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = base / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    shutil.rmtree(source)  # nothing of the checkout left to import from
    return venv / "bin"


def test_a_users_session_from_a_pip_install(shared_dir):
    import http.client

    bindir = _install(shared_dir)
    folder = shared_dir / "mine"
    folder.mkdir()
    (folder / "mine.py").write_text(APP.format(version="v1"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    port = free_port()
    var = folder / "var"

    def ff(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bindir / "fcgi-finish"), *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def get(path: str = "/") -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    assert ff("--version").stdout.startswith("fcgi-finish 0.1.0")
    serve = subprocess.run(
        [str(bindir / "fcgi-serve"), "--version"], capture_output=True, text=True
    )
    assert serve.stdout.startswith("fcgi-serve 0.1.0")
    where = subprocess.run(
        [str(bindir / "python"), "-c", "import fcgi_finish; print(fcgi_finish.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(shared_dir / "venv"))  # the wheel's, not the checkout's

    result = ff("start", "mine:app", "--listen", f"127.0.0.1:{port}")
    user = "www-data"
    if result.returncode != 0:
        # The base python lives where www-data cannot go (a pyenv under /root, 0700):
        # the check names the folder and the fixes, fast, with nothing started...
        assert "RUN_USER www-data cannot reach" in result.stderr, result.stderr
        assert "chmod o+x" in result.stderr and "RUN_USER=root" in result.stderr
        assert not (var / "run" / "supervisord.pid").exists()
        # ...and the session goes on as root, the fix it names, with the rest kept.
        user = "root"
        result = ff("start", "--user", "root")
    assert result.returncode == 0, result.stderr
    assert f"on http://127.0.0.1:{port}/ with 2 worker(s) of mine:app as {user}" in result.stdout
    assert get() == b"v1"
    uid = int(get("/whoami").removeprefix(b"uid="))
    assert uid == (0 if user == "root" else int(subprocess.check_output(["id", "-u", user])))
    rendered = (var / "run" / "supervisord.conf").read_text()
    assert f"command={shared_dir / 'venv'}/bin/python" in rendered  # the user's virtualenv

    status = ff("status")
    assert status.returncode == 0, status.stdout
    assert "STARTING" not in status.stdout and "celery" not in status.stdout
    assert [ln.split()[0] for ln in status.stdout.splitlines()[:3]] == [
        "app:app_00",
        "app:app_01",
        "nginx",
    ]
    assert "max children reached: 0" in status.stdout

    # A second start with another port is refused and saves nothing: the file still
    # says what runs, so status still reads this stack's page.
    saved = (var / "fcgi-finish.env").read_bytes()
    other = free_port()
    result = ff("start", "--listen", f"127.0.0.1:{other}")
    assert result.returncode == 1 and "already running" in result.stderr, result.stderr
    assert f"fcgi-finish restart NGINX_LISTEN=127.0.0.1:{other}" in result.stderr
    assert (var / "fcgi-finish.env").read_bytes() == saved
    status = ff("status")
    assert status.returncode == 0 and "max children reached: 0" in status.stdout

    # A bare restart: the same app on the same port, from the saved configuration.
    before = stack_pids(var)
    result = ff("restart")
    assert result.returncode == 0, result.stderr
    assert get() == b"v1" and stack_pids(var).isdisjoint(before)

    # Changed code: every worker reloads in place (same pids) and serves it.
    pids = stack_pids(var)
    (folder / "mine.py").write_text(APP.format(version="v2"))
    shutil.rmtree(folder / "__pycache__", ignore_errors=True)
    result = ff("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("reloaded, serving the new code") == 2
    assert get() == b"v2" and stack_pids(var) == pids

    # Broken code: refused, with its traceback, a non-zero exit; the old code serves.
    (folder / "mine.py").write_text(APP.format(version="v3") + "\ndef broken(:\n")
    shutil.rmtree(folder / "__pycache__", ignore_errors=True)
    result = ff("reload")
    assert result.returncode == 1
    assert result.stderr.count("refused the new code") == 2
    assert result.stderr.count("SyntaxError") == 1  # shown once: both workers refused alike
    assert "SyntaxError" in result.stderr and 'mine.py", line' in result.stderr
    assert get() == b"v2" and get() == b"v2" and stack_pids(var) == pids

    pids = stack_pids(var)
    result = ff("stop")
    assert result.returncode == 0 and result.stdout.strip() == "stopped"
    assert not left_running(pids)
    assert ff("status").returncode == 3
