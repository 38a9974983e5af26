"""The command line as a user meets it: help, and one clear line for each mistake."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

from fcgi.options import OPTIONS, Options
from tests import fcgi_client
from tests.procs import ROOT, fcgi_command, python_env, run_fcgi, stop, wait_for

run = run_fcgi


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines but the warning a worker started as root gives (the tests run as root)."""
    return [ln for ln in result.stderr.strip().splitlines() if "running the app as root" not in ln]


def help_entries() -> list[tuple[str, str, str | None]]:
    """(flag, variable, default shown or None) for each option, as --help prints them."""
    out = subprocess.run(
        [sys.executable, "-m", "fcgi", "--help"],
        env=python_env(COLUMNS="100000"),  # one line per option: argparse wraps at hyphens
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    out = re.sub(r"\n {3,}", " ", out)  # a long flag puts its help on the next line
    found = re.findall(
        r"^  (--[a-z-]+) \S+ .*\(env (FCGI_\w+)(?:; default: (.*))?\)$", out, re.MULTILINE
    )
    return [(flag, env, default or None) for flag, env, default in found]


def test_every_option_in_help_works_as_shown_from_the_command_line_and_its_variable():
    """What --help shows is what the worker does: each flag it lists is accepted with
    the default it shows, which is the default in force, and so is its variable."""
    entries = help_entries()
    assert len(entries) >= 30
    plain = vars(Options.parse(["x:app"], {}))
    for flag, env, shown in entries:
        name = flag[2:].replace("-", "_")
        if shown is None:  # no default (off, or the inherited socket): the variable is read
            assert env in (opt.env for opt in OPTIONS), flag
            continue
        assert vars(Options.parse([flag, shown, "x:app"], {}))[name] == plain[name], flag
        assert vars(Options.parse(["x:app"], {env: shown}))[name] == plain[name], env
    given = vars(Options.parse(["--threads", "3", "x:app"], {"FCGI_THREADS": "5"}))
    assert given["threads"] == 3  # the command line wins over the variable
    assert vars(Options.parse(["x:app"], {"FCGI_THREADS": "5"}))["threads"] == 5


def test_bad_option_value_names_the_option():
    result = run("--threads", "0", "tests.apps:hello")
    assert result.returncode == 2
    assert "--threads" in result.stderr and "must be 1 or more" in result.stderr


def test_bad_environment_value_names_the_variable():
    result = run_fcgi("tests.apps:hello", env=python_env(FCGI_THREADS="many"))
    assert result.returncode == 2 and "FCGI_THREADS" in result.stderr


def test_unimportable_app_is_one_line():
    result = run("--bind", "127.0.0.1:0", "no_such_module:app")
    assert result.returncode == 2
    assert errors(result) == [
        "fcgi-serve: error: cannot import module 'no_such_module': run from the folder that "
        "holds it, or give that folder with --chdir or --pythonpath"
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
        fcgi_command("tests.apps:hello"),
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
        fcgi_command("--bind", f"unix:{path}", "--socket-mode", "600", "tests.apps:hello"),
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


def project(tmp_path):
    """A Django-shaped project: proj/src/mysite/wsgi.py, importable as mysite.wsgi."""
    package = tmp_path / "proj" / "src" / "mysite"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "wsgi.py").write_text(
        "import os\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [os.getcwd().encode()]\n"
    )
    return tmp_path / "proj"


def test_chdir_and_pythonpath_as_gunicorn_means_them(tmp_path):
    proj = project(tmp_path)
    sock = tmp_path / "app.sock"
    for args, env in (
        (["--chdir", str(proj), "--pythonpath", "src"], {}),
        ([], {"FCGI_CHDIR": str(proj), "FCGI_PYTHONPATH": "src"}),
    ):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fcgi",
                "--bind",
                f"unix:{sock}",
                *args,
                "mysite.wsgi:application",
            ],
            cwd=tmp_path,
            env=python_env(**env),
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(sock.exists, what="the socket")
            client = fcgi_client.Client(str(sock))
            assert client.request("/").body == str(proj).encode()  # ran in --chdir
            client.close()
        finally:
            assert stop(proc) == 0
            proc.stderr.close()


def test_module_not_found_names_chdir_and_pythonpath(tmp_path):
    proj = project(tmp_path)
    result = run("--bind", "127.0.0.1:0", "--chdir", str(proj), "mysite.wsgi:application")
    assert result.returncode == 2
    assert "cannot import module 'mysite.wsgi'" in result.stderr and "--pythonpath" in result.stderr


def test_an_app_that_raises_while_loading_shows_its_traceback_at_once(tmp_path):
    (tmp_path / "brokenapp.py").write_text(
        "import json\n\ndef helper():\n    raise KeyError('DATABASES')\n\nhelper()\n"
    )
    result = run("--bind", "127.0.0.1:0", "--chdir", str(tmp_path), "brokenapp:application")
    assert result.returncode == 2  # at once: run() gives up after 30 s
    err = result.stderr
    assert "ERROR fcgi: importing 'brokenapp' raised KeyError: 'DATABASES'" in err
    assert "Traceback (most recent call last):" in err
    assert f'File "{tmp_path}/brokenapp.py", line 4, in helper' in err
    assert err.rstrip().endswith("KeyError: 'DATABASES'")


def test_environment_values_are_converted_once_and_the_command_line_wins():
    from fcgi.options import Options

    env = {"FCGI_MOUNT": "/app/", "FCGI_PYTHONPATH": "a,b", "FCGI_THREADS": "4"}
    options = Options.parse(["--threads", "2", "x:app"], env)
    assert options.mount == "/app" and options.threads == 2
    assert options.pythonpath == ("a", "b")
    assert Options.parse(["x:app"], {}).threads == 1


def test_a_folder_closed_to_the_workers_user_is_named_with_its_mode(shared_dir):
    """``--user`` checks, once it is that user, that it can reach this Python's standard
    library (lazy imports would fail later, inside the app); the check names the first
    closed folder on the way. Run as nobody in a child, against a 0700 folder of root's
    inside one open to all."""
    import os
    import pwd

    from fcgi.cli import _closed_to_me

    closed = shared_dir / "closed"
    (closed / "lib").mkdir(parents=True)
    closed.chmod(0o700)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, report both answers, exit without cleanup
        try:
            os.setuid(pwd.getpwnam("nobody").pw_uid)
            stdlib = os.path.dirname(os.__file__)
            answers = f"{_closed_to_me(str(closed / 'lib'))}|{_closed_to_me(stdlib)}"
            os.write(write, answers.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answers = f.read()
    os.waitpid(pid, 0)
    inside, stdlib = answers.split("|")
    assert inside == f"{closed} (mode 700)"
    assert stdlib in ("", "/root (mode 700)")  # Debian's Python is open; pyenv's under /root


LAZY_APP = """
def __getattr__(name):  # a package that imports its app lazily, as wsgi_app.demo does
    raise RuntimeError("the database is down")
"""


def test_an_app_whose_lazy_import_raises_is_refused_with_its_traceback(tmp_path):
    """The demo's `application` is a module __getattr__ that imports it: a failure
    there (its journal locked) escaped as a bare traceback and exit 1, which
    supervisord restarted as a crash, not the refusal (exit 2) of a broken app."""
    (tmp_path / "lazy.py").write_text(LAZY_APP)
    result = run("--bind", "127.0.0.1:0", "--pythonpath", str(tmp_path), "lazy:application")
    assert result.returncode == 2, result.stderr
    assert "loading 'lazy:application' raised RuntimeError: the database is down" in (result.stderr)
