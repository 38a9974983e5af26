"""The command line as a user meets it: help, and one clear line for each mistake."""

from __future__ import annotations

import socket
import subprocess
import sys

from fcgi.options import OPTIONS
from tests import fcgi_client
from tests.procs import ROOT, python_env, stop, wait_for


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fcgi", *args],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=30,
        **kwargs,
    )


def test_help_documents_every_option():
    out = run("--help").stdout
    for opt in OPTIONS:
        assert opt.flag in out and opt.env in out, opt.name
    assert "MODULE:CALLABLE" in out


def test_bad_option_value_names_the_option():
    result = run("--threads", "0", "tests.apps:hello")
    assert result.returncode == 2
    assert "--threads" in result.stderr and "must be 1 or more" in result.stderr


def test_bad_environment_value_names_the_variable():
    env = python_env(FCGI_THREADS="many")
    result = subprocess.run(
        [sys.executable, "-m", "fcgi", "tests.apps:hello"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "FCGI_THREADS" in result.stderr


def test_unimportable_app_is_one_line():
    result = run("--bind", "127.0.0.1:0", "no_such_module:app")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fcgi-serve: error: cannot import module 'no_such_module': run from the folder that "
        "holds it, or add that folder to PYTHONPATH"
    ]
    result = run("--bind", "127.0.0.1:0", "tests.apps:nothing_here")
    assert "has no 'nothing_here'" in result.stderr and result.returncode == 2
    result = run("--bind", "127.0.0.1:0", "tests.apps")
    assert "is not MODULE:CALLABLE" in result.stderr


def test_unbindable_socket_paths(tmp_path):
    result = run("--bind", f"unix:{tmp_path}/missing/dir/app.sock", "tests.apps:hello")
    assert result.returncode == 2 and "does not exist" in result.stderr
    (tmp_path / "plain").write_text("x")
    result = run("--bind", f"unix:{tmp_path}/plain", "tests.apps:hello")
    assert result.returncode == 2 and "not a socket" in result.stderr


def test_port_in_use_says_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--bind", f"127.0.0.1:{port}", "tests.apps:hello")
    assert result.returncode == 2 and "port is in use" in result.stderr


def test_no_bind_and_no_socket_on_fd0():
    result = run("tests.apps:hello", stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "fd 0 is not a listening socket" in result.stderr


def test_serves_the_listening_socket_on_fd0(tmp_path):
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcgi", "tests.apps:hello"],
        cwd=ROOT,
        env=python_env(),
        stdin=listener.fileno(),
        stderr=subprocess.PIPE,
    )
    listener.close()
    try:
        client = fcgi_client.Client(path)
        assert client.request("/").body == b"Hello world\n"
        client.close()
    finally:
        assert stop(proc) == 0
        proc.stderr.close()


def test_unix_socket_mode_and_removal(tmp_path):
    path = tmp_path / "app.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fcgi",
            "--bind",
            f"unix:{path}",
            "--socket-mode",
            "600",
            "tests.apps:hello",
        ],
        cwd=ROOT,
        env=python_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(path.exists, what="the socket file")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        assert stop(proc) == 0
    assert not path.exists()


def test_readme_documents_every_option_and_setting():
    from wsgi_app.deferred import SETTINGS

    readme = (ROOT / "README.md").read_text()
    for opt in OPTIONS:
        assert f"`{opt.flag}" in readme and f"`{opt.env}`" in readme, opt.name
    for s in SETTINGS:
        assert f"| `{s.name}` | `{s.env}` | {s.default} |" in readme, s.name
