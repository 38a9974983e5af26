"""The stack's one configuration (fcgi_finish.config, .settings) and its checks before
start (fcgi_finish.checks): read as systemd and a shell read it, given once and kept,
mistakes refused naming the fix. No stack is started here."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess

import pytest

from fcgi_finish import checks, config, settings
from fcgi_finish.config import COMMAND_LINE, DEFAULT, ENVIRONMENT
from tests.procs import fcgi_finish


@pytest.mark.slow
def test_given_once_kept_and_read_by_a_shell_as_it_is(tmp_path):
    state = tmp_path / "var"
    tricky = '{time} "{method} {uri}" $HOME `x` back\\slash'
    given = {"APP": "mine:app", "NUMPROCS": "3", "FCGI_ACCESS_LOG_FORMAT": tricky}
    first = config.load(state, given, environ={"FCGI_THREADS": "4", "HOME": "/x"})
    assert first.values["NUMPROCS"].origin == COMMAND_LINE
    assert first.values["FCGI_THREADS"].origin == ENVIRONMENT
    assert first.values["NGINX_LISTEN"].origin == DEFAULT
    assert config.save(first)

    # A later bare load: everything given before, from the file, with its line.
    later = config.load(state, {}, environ={})
    for key, text in {**given, "FCGI_THREADS": "4"}.items():
        assert later[key] == text
        assert later.values[key].origin.startswith(f"{state / config.FILE_NAME}:")
    # A later command line wins over the file and is saved in place.
    config.save(config.load(state, {"NUMPROCS": "5"}, environ={}))
    text = (state / config.FILE_NAME).read_text()
    assert text.count("\nNUMPROCS=") == 1 and "NUMPROCS=5" in text
    assert "#NGINX_LISTEN=127.0.0.1:8080" in text  # documented at its default

    # A shell (as systemd's EnvironmentFile=) reads the same values from the file.
    shown = subprocess.run(
        ["sh", "-c", 'set -a; . "$1"; env -0', "sh", str(state / config.FILE_NAME)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env = dict(item.split("=", 1) for item in shown.split("\0") if "=" in item)
    assert env["FCGI_ACCESS_LOG_FORMAT"] == tricky
    assert env["APP"] == "mine:app" and env["NUMPROCS"] == "5" and env["FCGI_THREADS"] == "4"

    # The user's own edits and comments stay.
    path = state / config.FILE_NAME
    path.write_text(path.read_text() + "# my note\nFCGI_LOG_LEVEL=debug\n")
    config.save(config.load(state, {"NUMPROCS": "6"}, environ={}))
    assert "# my note\nFCGI_LOG_LEVEL=debug\n" in path.read_text()


@pytest.mark.slow
def test_mistakes_are_refused_naming_the_setting_and_the_fix(tmp_path):
    state = tmp_path / "var"
    cases = {
        "FCGI_THEADS=4": ("FCGI_THEADS", "did you mean FCGI_THREADS?"),
        "FCGI_THREADS=abc": ("FCGI_THREADS='abc' (--threads)", "'abc' is not a whole number"),
        "NUMPROCS=abc": ("NUMPROCS='abc' (--workers)", "expected N"),
        "NUMPROCS=0": ("NUMPROCS='0'", "must be 1 or more"),
        "NGINX_LISTEN=8080": ("NGINX_LISTEN='8080'", "HOST:PORT"),
        "NGINX_LISTEN=127.0.0.1:99999": ("NGINX_LISTEN='127.0.0.1:99999'", "port from 1 to 65535"),
        "FCGI_BIND=unix:x": ("FCGI_BIND is set by the stack", "supervisord"),
        "FCGI_USER=bob": ("FCGI_USER is set by the stack", "RUN_USER"),
        "DEFERRED_THREDS=2": ("DEFERRED_THREDS", "did you mean DEFERRED_THREADS?"),
    }
    for word, expected in cases.items():
        result = fcgi_finish("start", "--state-dir", str(state), word)
        assert result.returncode == 2, (word, result.stderr)
        for part in expected:
            assert part in result.stderr, (word, result.stderr)
        assert "does not load" not in result.stderr and "usage:" not in result.stderr
    assert not (state / config.FILE_NAME).exists()  # nothing saved, nothing started
    assert not (state / "run").exists()

    # A mistake in the file names its line; one in the environment says so.
    state.mkdir()
    (state / config.FILE_NAME).write_text("APP=mine:app\nNUMPROCS=two\n")
    result = fcgi_finish("config", "--state-dir", str(state), env={**os.environ, "FCGI_X": "1"})
    assert result.returncode == 2
    assert f"(from {state / config.FILE_NAME}:2)" in result.stderr
    assert "unknown setting FCGI_X" in result.stderr and "(in environment)" in result.stderr


@pytest.mark.slow
def test_config_prints_each_setting_and_where_it_came_from(tmp_path):
    state = tmp_path / "var"
    assert fcgi_finish("config", "--state-dir", str(state), "--workers", "3").returncode == 0
    result = fcgi_finish("config", "--state-dir", str(state), "--threads", "2", "mine:app")
    lines = dict(
        (ln.split("=", 1)[0], ln) for ln in result.stdout.splitlines() if not ln.startswith("#")
    )
    assert (
        lines["NUMPROCS"].startswith("NUMPROCS=3 ") and f"{config.FILE_NAME}:" in lines["NUMPROCS"]
    )
    assert lines["FCGI_THREADS"].endswith("# command line")
    assert lines["APP"].startswith("APP=mine:app ")
    assert lines["NGINX_LISTEN"].endswith("# default")
    assert set(lines) == {e.key for e in settings.ENTRIES}  # every setting, once
    # a command that does not start the stack refuses to change what is in force
    result = fcgi_finish("status", "--state-dir", str(state), "NUMPROCS=4")
    assert result.returncode == 2 and "fcgi-finish restart NUMPROCS=4" in result.stderr
    assert fcgi_finish("status", "--state-dir", str(state), "NUMPROCS=3").returncode == 3
    # make passes its KEY=VALUE words in the environment too: still refused, not ignored
    for command in ("status", "reload", "stop"):
        env = {**os.environ, "FCGI_THREADS": "4"}
        result = fcgi_finish(command, "--state-dir", str(state), "FCGI_THREADS=4", env=env)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "make restart FCGI_THREADS=4" in result.stderr


@pytest.mark.slow
def test_the_workers_user_is_checked_for_the_app_folder_and_its_sqlite_files(shared_dir):
    assert os.geteuid() == 0, "the tests run as root"
    app = shared_dir / "mysite"
    (app / "mysite").mkdir(parents=True)
    (app / "mysite" / "__init__.py").write_text("")
    (app / "mysite" / "wsgi.py").write_text(
        'import os\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n'
    )
    (app / "mysite" / "settings.py").write_text(
        "from pathlib import Path\nDATABASES = {'default': {'ENGINE': "
        "'django.db.backends.sqlite3', 'NAME': Path(__file__).parent.parent / 'db.sqlite3'}}\n"
    )
    (app / "db.sqlite3").write_bytes(b"")  # as `manage.py migrate` as root leaves it
    (app / "db.sqlite3").chmod(0o644)
    python = "/usr/bin/python3"  # reachable by www-data wherever the checkout is

    def check(spec: str = "mysite.wsgi:application") -> str:
        with pytest.raises(checks.CheckFailed) as failed:
            checks.workers_can_run("www-data", python, [], [app], spec, "", {})
        return str(failed.value)

    text = check()
    assert f"RUN_USER www-data cannot write {app / 'db.sqlite3'} (owner root, mode 644)" in text
    assert "Django's DATABASES in mysite.settings" in text
    assert f"chown www-data {app / 'db.sqlite3'} {app}" in text

    app.chmod(0o700)  # the app's folder closed to other users
    text = check()
    assert f"closed to other users: {app} (mode 700)" in text
    assert f"chmod o+rx {app}" in text and "RUN_USER=root" in text

    app.chmod(0o755)
    shutil.chown(app / "db.sqlite3", "www-data")
    shutil.chown(app, "www-data")
    text = check()  # what is left: Debian's python3 has no fcgi package of its own
    assert "cannot write" not in text and "closed" not in text
    assert "cannot import the code with /usr/bin/python3" in text
    assert f"cannot import module 'nosuchsite.wsgi' from FCGI_CHDIR={app}" in check(
        "nosuchsite.wsgi:a"
    )
    with pytest.raises(checks.CheckFailed) as failed:  # a folder that is not there
        checks.workers_can_run("www-data", python, [], [app / "nope"], "x:a", "", {})
    assert (
        f"FCGI_CHDIR={app / 'nope'}: No such file or directory: give the folder that holds "
        "the app with FCGI_CHDIR=" in str(failed.value)
    )


def test_a_taken_port_and_a_missing_nginx_are_named_with_the_fix():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(checks.CheckFailed, match=f"port {port}.*another program is listening"):
            checks.port_free(f"127.0.0.1:{port}")
    with pytest.raises(checks.CheckFailed, match="apt-get install -y nginx-light"):
        checks.nginx_installed("/nonexistent/nginx")
    with pytest.raises(checks.CheckFailed, match=r"not installed \(not on PATH nor in /usr/sbin"):
        checks.nginx_installed("nginx", given=False)


def test_a_taken_port_is_refused_with_a_port_free_now_or_none(monkeypatch):
    """The port suggested instead is one nothing listens on at that moment (the next
    one may be taken too), and none is suggested where no port near it would do."""
    import socket

    with contextlib.ExitStack() as held:
        taken = held.enter_context(socket.socket())
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        nxt = held.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # if it is already taken, so much the better
            nxt.bind(("127.0.0.1", port + 1))
            nxt.listen()
        with pytest.raises(checks.CheckFailed) as refused:
            checks.port_free(f"127.0.0.1:{port}")
        text = str(refused.value)
        found = re.search(
            r"--listen 127\.0\.0\.1:(\d+) \(make start NGINX_LISTEN=127\.0\.0\.1:(\d+)\)", text
        )
        assert found and found.group(1) == found.group(2), text
        other = int(found.group(1))
        assert other not in (port, port + 1), text
        with socket.socket() as probe:  # free now: it can be listened on
            probe.bind(("127.0.0.1", other))
    # Every port near it taken too: none is suggested.
    monkeypatch.setattr(checks, "_bind_error", lambda host, port: OSError(errno.EADDRINUSE, ""))
    with pytest.raises(checks.CheckFailed) as refused:
        checks.port_free(f"127.0.0.1:{port}")
    assert "choose another port: fcgi-finish start --listen HOST:PORT" in str(refused.value)
    assert "NGINX_LISTEN=" not in str(refused.value)


def test_an_empty_nginx_bin_is_the_nginx_found_at_start(tmp_path):
    from fcgi_finish import stack

    state = tmp_path / "var"
    found = settings.default_nginx(state)
    assert stack.nginx_bin(config.load(state, {"NGINX_BIN": ""}, environ={})) == found
    given = config.load(state, {"NGINX_BIN": "/opt/nginx/sbin/nginx"}, environ={})
    assert stack.nginx_bin(given) == "/opt/nginx/sbin/nginx"
    blank = config.load(state, {"NGINX_BIN": ""}, environ={})
    assert f"command={found} " in stack.supervisord_conf(blank)


def test_the_rendered_supervisord_conf_follows_the_configuration(tmp_path):
    from fcgi_finish import stack

    def rendered(**given: str) -> str:
        return stack.supervisord_conf(config.load(tmp_path / "var", given, environ={}))

    plain = rendered()
    assert "\n[program:celery]" not in plain  # not part of the stack unless asked for
    assert "--cpu-affinity %(process_num)d" in plain and "stopwaitsecs=40 " in plain
    assert f'DEFERRED_JOURNAL="{tmp_path}/var/lib/deferred.sqlite3"' in plain
    asked = rendered(
        DEFERRED_CELERY="redis://127.0.0.1:6379/0",
        FCGI_GRACEFUL_TIMEOUT="60",
        FCGI_CPU_AFFINITY="off",
        DEFERRED_JOURNAL="",
    )
    assert "\n[program:celery]" in asked and 'DEFERRED_CELERY="redis://127.0.0.1:6379/0"' in asked
    assert "--cpu-affinity off" in asked and "stopwaitsecs=70 " in asked
    assert 'DEFERRED_JOURNAL=""' in asked  # memory only
    assert "@" not in "".join(ln for ln in asked.splitlines() if not ln.startswith(";"))


def test_a_bad_value_names_the_form_expected_in_full():
    """A DEFERRED_* setting names its form (N, SECONDS, 1|0) as the FCGI_* ones do, and
    its meaning is a whole clause: never cut where an aside in parentheses began."""
    cases = {
        "DEFERRED_THREADS": (
            "abc",
            "DEFERRED_THREADS='abc' (--deferred-threads): 'abc' is not a whole number; "
            "expected N: most plain functions running at once: the pool grows while calls "
            "block and shrinks when idle, so blocking calls overlap without holding requests",
        ),
        "DEFERRED_SLOW": ("-1", "expected SECONDS: log the stack of a call running longer"),
        "DEFERRED_PROCESS": ("maybe", "must be 1 or 0 (true or false); expected 1|0: run"),
        "FCGI_MAX_DETACHED": (
            "x",
            "expected N: requests that may go on running after fcgi.finish_request without "
            "holding one of --threads",
        ),
        "FCGI_THREADS": ("abc", "expected N: requests run at once in this process"),
    }
    for key, (bad, expected) in cases.items():
        with pytest.raises(settings.SettingError) as refused:
            settings.check_value(settings.BY_KEY[key], bad)
        assert expected in str(refused.value), str(refused.value)
    assert [e.key for e in settings.ENTRIES if e.metavar == "VALUE"] == []
