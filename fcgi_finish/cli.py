"""``fcgi-finish``: the whole stack (nginx in front of a pool of workers under
supervisord) from any virtualenv, configured once.

    fcgi-finish start mysite.wsgi:application --listen 127.0.0.1:8080 --workers 4
    fcgi-finish status | reload | restart | stop | logs | config | service | run | demo

Settings come as flags or ``KEY=VALUE`` words (what ``make start KEY=VALUE`` passes)
and are saved in the state folder's ``fcgi-finish.env``, which every later command and
the systemd unit read: a bare ``fcgi-finish restart`` runs the same stack.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from fcgi import __version__

from . import reloads, stack
from .config import COMMAND_LINE, Config, load, quote, save
from .settings import ENTRIES, PATH_KEYS, SettingError
from .supervisor import Supervisor

_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
# Commands that take settings (and save them); the others run the stack as it is.
CONFIGURING = ("start", "run", "restart", "service", "config")
COMMANDS = {
    "start": "start the stack in the background; returns once every worker and nginx run",
    "run": "the same in the foreground (Ctrl-C stops it all; what the systemd unit runs)",
    "stop": "stop it all, gracefully (requests and deferred work finish first)",
    "restart": "stop, then start with the saved settings (and any given now)",
    "reload": "new code, no request dropped: every worker checks it, then reloads in "
    "place; fails, with the traceback, if a worker refused it (the old code keeps serving)",
    "status": "this stack's programs and the pool's status page",
    "logs": "follow every log of the stack",
    "service": "render a systemd unit for this stack (STATE/fcgi-finish.service)",
    "config": "print each setting in force and where it came from (saving any given)",
    "demo": "run the demo experiment against the stack (the demo app)",
}


def _settings_help() -> str:
    lines = [
        "settings (KEY=VALUE, or the flag shown; saved in STATE/fcgi-finish.env, which "
        "every command and the systemd unit read):"
    ]
    for entry in ENTRIES:
        flag = f" {entry.flag} {entry.metavar}" if entry.flag else " (or the first word)"
        default = entry.default if isinstance(entry.default, str) else "(see config)"
        lines.append(f"  {entry.key}{flag}")
        lines.append(f"      {entry.help} (default: {default or 'none'})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcgi-finish",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fcgi-finish {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        default="var",
        metavar="DIR",
        help="the stack's folder: its configuration, sockets, logs (default: ./var)",
    )
    settings = argparse.ArgumentParser(add_help=False)
    for entry in ENTRIES:
        if entry.flag:
            settings.add_argument(
                entry.flag,
                dest=entry.key,
                metavar=entry.metavar,
                default=argparse.SUPPRESS,
                help=f"{entry.key}: {entry.help}",
            )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        parents = [common, settings] if name in CONFIGURING else [common]
        cmd = sub.add_parser(name, parents=parents, help=help_, description=help_)
        cmd.add_argument(
            "words",
            nargs="*",
            metavar="[APP] [KEY=VALUE ...]" if name in CONFIGURING else "[KEY=VALUE ...]",
            help="the app (MODULE:CALLABLE) and settings, e.g. FCGI_THREADS=4"
            if name in CONFIGURING
            else "settings in force (a change needs fcgi-finish restart)",
        )
    return parser


def _given(args: argparse.Namespace) -> dict[str, str]:
    """The settings the command line gives, paths made absolute (from where it runs)."""
    given: dict[str, str] = {}
    for word in args.words:
        match = _ASSIGNMENT.fullmatch(word)
        if match:
            given[match.group(1)] = match.group(2)
        elif "APP" not in given:
            given["APP"] = word
        else:
            raise SettingError(f"unexpected {word!r}: give settings as KEY=VALUE")
    given.update({e.key: getattr(args, e.key) for e in ENTRIES if hasattr(args, e.key)})
    for key in PATH_KEYS:
        if given.get(key):
            given[key] = os.path.abspath(given[key])
    return given


def configuration(args: argparse.Namespace) -> Config:
    """What is in force; settings given to a command that does not (re)start the stack
    must already be in force. A start refused because the stack runs saves nothing."""
    state = Path(args.state_dir)
    given = _given(args)
    config = load(state, given)
    # What the stack was started with is the file alone: make passes the words it was
    # given in the environment too, so a comparison with the environment sees no change.
    saved = load(state, {}, environ={})
    changed = [k for k in given if saved[k] != config[k]]
    shown = " ".join(f"{k}={quote(config[k])}" for k in changed)
    if args.command in ("start", "run"):
        sup = Supervisor(config.state)
        if sup.running():
            fix = (
                f"to apply {', '.join(changed)}: fcgi-finish restart {shown} (make restart "
                f"{shown}); nothing was saved"
                if changed
                else "fcgi-finish status, or fcgi-finish restart (make status, make restart)"
            )
            raise stack.StackError(f"already running (supervisord pid {sup.pid()}): {fix}")
    if args.command in CONFIGURING:
        save(config)
        return config
    if changed:
        raise SettingError(
            f"{args.command} does not change settings ({', '.join(changed)}): they take "
            f"effect at a start: fcgi-finish restart {shown} (make restart {shown})"
        )
    return saved


def _error(message: str) -> None:
    print(f"fcgi-finish: error: {message}", file=sys.stderr, flush=True)


def cmd_start(config: Config) -> int:
    stack.start(config, tell=_error)
    print(stack.banner(config))
    return 0


def cmd_restart(config: Config) -> int:
    print(stack.stop(config.state))
    return cmd_start(config)


def cmd_run(config: Config) -> int:
    print(stack.banner(config) + "; Ctrl-C stops it all", flush=True)
    stack.run(config)
    return 0  # not reached: run() becomes supervisord


def cmd_stop(config: Config) -> int:
    print(stack.stop(config.state))
    return 0


def cmd_reload(config: Config) -> int:
    live = stack.running(config)
    text, ok = reloads.report(reloads.reload(live))
    (sys.stdout if ok else sys.stderr).write(text + stack.drift(config, live))
    return 0 if ok else 1


def cmd_status(config: Config) -> int:
    text, ok = stack.status(config)
    sys.stdout.write(text)
    return 0 if ok else 3


def cmd_logs(config: Config) -> int:
    stack.logs(config.state)
    return 0


def cmd_service(config: Config) -> int:
    path = stack.service(config)
    print(path)
    print(
        f"install it: sudo cp {path} /etc/systemd/system/ && sudo systemctl daemon-reload "
        "&& sudo systemctl enable --now fcgi-finish"
    )
    sys.stdout.write(stack.drift(config, stack.running(config)))
    return 0


def cmd_config(config: Config) -> int:
    sys.stdout.write(config.describe())
    if any(v.origin == COMMAND_LINE for v in config.values.values()):
        print(f"# saved in {config.file}; a running stack takes it at fcgi-finish restart")
    note = stack.drift(config, stack.running(config))
    if note:
        print(f"# {note}", end="")
    return 0


def cmd_demo(config: Config) -> int:
    from wsgi_app.demo import client

    live = stack.running(config)
    scheme = "https" if live["TLS_CERT"] else "http"
    url = f"{scheme}://{live['NGINX_LISTEN']}/demo"
    return client.main([url, str(config.state / "log" / "demo.log")])


RUN: dict[str, Callable[[Config], int]] = {
    "start": cmd_start,
    "run": cmd_run,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "reload": cmd_reload,
    "status": cmd_status,
    "logs": cmd_logs,
    "service": cmd_service,
    "config": cmd_config,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return RUN[args.command](configuration(args))
    except SettingError as exc:
        _error(str(exc))
        return 2
    except stack.StackError as exc:
        if not exc.told:
            _error(str(exc))
        return 1
