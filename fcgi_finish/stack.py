"""The stack's life: its state folder prepared, its files rendered, supervisord started
(in the background or in the foreground) and stopped, its status, its systemd unit.

One state folder (``./var`` by default) is one stack: ``fcgi-finish.env`` (the
configuration), ``run/`` (sockets, pids, the rendered nginx.conf and supervisord.conf,
a copy of the settings it was started with, the scoreboard), ``log/``, ``lib/`` (the
journal), ``tmp/`` (nginx's buffers). What talks to the running stack uses that copy:
the saved configuration may have changed since, and takes effect at a restart.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import fcgi
import wsgi_app

from . import checks, readiness, render
from .config import FILE_NAME, Config, load_copy, quote, write_copy
from .settings import ENTRIES, default_nginx, proxies, stop_wait
from .supervisor import Supervisor


class StackError(Exception):
    """The command cannot do what it was asked; the message says why and what to do.
    ``told``: the message was already shown (before a slow cleanup)."""

    def __init__(self, message: str, told: bool = False) -> None:
        super().__init__(message)
        self.told = told


def python() -> str:
    """The python the workers run: fcgi-finish's own, so the app's virtualenv's."""
    return sys.executable


def command() -> str:
    """How to run fcgi-finish again (in a unit): its console script beside this python."""
    script = Path(sys.executable).parent / "fcgi-finish"
    return str(script) if script.exists() else f"{sys.executable} -m fcgi_finish"


def nginx_bin(config: Config) -> str:
    """NGINX_BIN, or (left empty) the nginx found on PATH or in /usr/sbin."""
    return config["NGINX_BIN"] or default_nginx(config.state)


def template_values(config: Config) -> dict[str, str]:
    """Every placeholder of the stack's templates, from the configuration."""
    state = config.state
    values = render.web_server_values(
        config["NGINX_LISTEN"], state / "run" / "app.sock", state, config["RUN_USER"]
    )
    if config["TLS_CERT"]:
        values.update(render.tls_values(str(config.path("TLS_CERT")), str(config.path("TLS_KEY"))))
    values.update(render.proxy_values(proxies(config["TRUSTED_PROXIES"])))
    values.update(
        STATIC=str(config.path("STATIC_DIR")),
        APP=config["APP"],
        NUMPROCS=config["NUMPROCS"],
        PYTHON=python(),
        RUN_USER=config["RUN_USER"],
        CHDIR=str(config.path("FCGI_CHDIR")),
        NGINX_BIN=nginx_bin(config),
        DEFERRED_JOURNAL=config["DEFERRED_JOURNAL"] and str(config.path("DEFERRED_JOURNAL")),
        DEFERRED_CELERY=config["DEFERRED_CELERY"],
        STOPWAITSECS=str(stop_wait(config["FCGI_GRACEFUL_TIMEOUT"])),
        TIMEOUT_STOP=str(stop_wait(config["FCGI_GRACEFUL_TIMEOUT"]) + 20),
        FCGI_FINISH=command(),
    )
    return values


def supervisord_conf(config: Config) -> str:
    # supervisord expands %(name)s in its file: a literal % is written %%
    values = {k: v.replace("%", "%%") for k, v in template_values(config).items()}
    values["CPU_AFFINITY"] = config["FCGI_CPU_AFFINITY"] or "%(process_num)d"
    text = render.render(render.template("supervisord.conf"), values)
    if config["DEFERRED_CELERY"]:
        text += render.render(render.template("supervisord-celery.conf"), values)
    return text


def nginx_conf(config: Config) -> str:
    return render.render(render.template("nginx.conf"), template_values(config))


def unit(config: Config) -> str:
    return render.render(render.template("fcgi-finish.service"), template_values(config))


def environment(config: Config) -> dict[str, str]:
    """supervisord's environment, which the workers inherit: this one, with the
    configuration's FCGI_* and DEFERRED_* variables in place of any others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FCGI_", "DEFERRED_"))}
    env.update(config.worker_environment())
    return env


def check(config: Config, port: bool = True) -> None:
    """The checks before start (checks.py), each failure naming its fix."""
    try:
        if port:
            checks.port_free(config["NGINX_LISTEN"])
        checks.nginx_installed(nginx_bin(config), given=bool(config["NGINX_BIN"]))
        checks.tls_files(
            config["TLS_CERT"] and str(config.path("TLS_CERT")),
            config["TLS_KEY"] and str(config.path("TLS_KEY")),
        )
        checks.workers_can_run(
            config["RUN_USER"],
            python(),
            [
                Path(fcgi.__file__),
                Path(wsgi_app.__file__),
                Path(os.path.realpath(Path(python()).parent)) / "python",  # a linked venv
                config.state / "run",
            ],
            [config.path("FCGI_CHDIR")],
            config["APP"],
            config["FCGI_PYTHONPATH"],
            environment(config),
        )
    except checks.CheckFailed as exc:
        raise StackError(str(exc)) from None


def prepare(config: Config) -> None:
    """The state folder's folders, given to the workers' user where they write (started
    as root), and the rendered nginx.conf and supervisord.conf."""
    state = config.state
    for sub in ("run/scoreboard", "log", "tmp", "lib"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    config.path("STATIC_DIR").mkdir(parents=True, exist_ok=True)
    user = config["RUN_USER"]
    if os.geteuid() == 0 and user != "root":
        entry = pwd.getpwnam(user)
        writes = [state / "log" / "access.log", state / "log" / "demo.log"]
        for path in writes:
            path.touch()
        for path in [state / "lib", *writes, state / "run" / "scoreboard"]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        for path in (state / "run" / "scoreboard").iterdir():
            os.chown(path, entry.pw_uid, entry.pw_gid)
    _write(state / "run" / "nginx.conf", nginx_conf(config))
    _write(state / "run" / "supervisord.conf", supervisord_conf(config))
    write_copy(config, state / "run" / FILE_NAME)


def running(config: Config) -> Config:
    """The settings the running stack was started with (the copy ``prepare`` left in
    run/), else ``config``: the saved ones, which may differ until a restart."""
    if not Supervisor(config.state).running():
        return config
    return load_copy(config.state, config.state / "run" / FILE_NAME) or config


def drift(saved: Config, live: Config) -> str:
    """A note of the saved settings that differ from those the stack runs with ("" if
    none do)."""
    changed = [e.key for e in ENTRIES if saved[e.key] != live[e.key]]
    if not changed:
        return ""
    shown = ", ".join(f"{k}={quote(saved[k])} (running: {quote(live[k])})" for k in changed)
    return (
        f"saved settings differ from the running stack's: {shown}; `fcgi-finish restart` "
        "(make restart) applies them\n"
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def banner(config: Config) -> str:
    scheme = "https" if config["TLS_CERT"] else "http"
    return (
        f"fcgi-finish on {scheme}://{config['NGINX_LISTEN']}/ with {config['NUMPROCS']} "
        f"worker(s) of {config['APP']} as {config['RUN_USER']} (settings: {config.file})"
    )


def start(config: Config, tell: Callable[[str], None]) -> None:
    """Start the stack in the background; return once every worker and nginx are
    RUNNING and answer. On a failure after launch, ``tell`` the cause at once, then stop
    what was started and raise."""
    sup = Supervisor(config.state)
    if sup.running():
        raise StackError(
            f"already running (supervisord pid {sup.pid()}): fcgi-finish status, or "
            "fcgi-finish restart"
        )
    check(config)
    prepare(config)
    marks = readiness.LogMarks(config.state)
    launched = sup.start_daemon(environment(config))
    if launched.returncode != 0:
        raise StackError(
            f"supervisord did not start: {(launched.stderr or launched.stdout).strip()}"
        )
    numprocs = int(config["NUMPROCS"])
    problem = readiness.wait_running(
        sup, marks, config["NGINX_LISTEN"], bool(config["TLS_CERT"]), numprocs
    )
    if problem:
        tell(problem)  # at once: stopping what was started takes a moment
        sup.shutdown()
        raise StackError(problem, told=True)


def run(config: Config) -> None:
    """Become supervisord in the foreground (Ctrl-C, or systemd's SIGTERM, stops it all)."""
    sup = Supervisor(config.state)
    if sup.running():
        raise StackError(f"already running (supervisord pid {sup.pid()}): fcgi-finish stop first")
    check(config)
    prepare(config)
    sup.exec_foreground(environment(config))


def stop(state: Path) -> str:
    sup = Supervisor(state)
    if not sup.running():
        return "not running"
    left = sup.shutdown()
    if left:
        raise StackError(f"stopped, but processes are still alive: {left}")
    return "stopped"


def status(config: Config) -> tuple[str, bool]:
    """supervisord's list of this stack's programs and the pool's status page, asked
    where the running stack listens; whether everything runs. A note follows if the
    saved settings differ from those it runs with."""
    sup = Supervisor(config.state)
    if not sup.running():
        return "not running: fcgi-finish start (make start)\n", False
    live = running(config)
    procs = sup.processes()
    lines = [f"{p.full_name:<14} {p.state:<9} {p.description}" for p in procs]
    listen = live["NGINX_LISTEN"]
    try:
        resp, body = readiness.get(listen, bool(live["TLS_CERT"]), "/fcgi-status")
    except OSError:
        page = f"nothing answers on {listen}; see {config.state}/log/nginx-error.log\n"
    else:
        if readiness.ours(resp, config.state):
            page = body.decode("utf-8", "replace")
        else:
            page = (
                f"this stack's nginx does not answer on {listen} (another server does); "
                f"see {config.state}/log/nginx-error.log\n"
            )
    ok = all(p.state == "RUNNING" for p in procs)
    return "\n".join(lines) + "\n\n" + page + drift(config, live), ok


def service(config: Config) -> Path:
    """The systemd unit for this stack, rendered into the state folder. Under a running
    stack, what it runs (run/) is left as it is: nginx restarted by supervisord would
    read a changed nginx.conf."""
    check(config, port=False)
    if not Supervisor(config.state).running():
        prepare(config)
    path = config.state / "fcgi-finish.service"
    _write(path, unit(config))
    return path


def logs(state: Path) -> None:
    """Follow every log of the stack (tail -F), until Ctrl-C."""
    log = state / "log"
    files = [*sorted(log.glob("app_*.log")), log / "access.log", log / "nginx-error.log"]
    files += [p for p in (log / "demo.log", log / "celery.log") if p.exists()]
    tail = shutil.which("tail") or "tail"
    sys.stdout.flush()
    os.execv(tail, [tail, "-F", *map(str, files)])
