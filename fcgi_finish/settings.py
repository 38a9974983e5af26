"""The stack's settings, declared once as one flat table.

A row per setting: the stack's own (APP, NUMPROCS, NGINX_LISTEN, ...), then every
worker option of ``fcgi.options.OPTIONS`` as ``FCGI_<NAME>`` and every middleware
setting of ``wsgi_app.deferred.SETTINGS`` as ``DEFERRED_<NAME>``. The same rows build
``fcgi-finish --help``, document the saved configuration file, validate names (an
unknown one is refused with the nearest known name) and values (a bad one names the
setting, the value and the form expected), and print ``fcgi-finish config``.

Values stay text, as the configuration file holds them; converting is only checking.
"""

from __future__ import annotations

import difflib
import os
import pwd
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcgi.options import OPTIONS, positive_int, seconds, user_name
from wsgi_app.deferred import SETTINGS

DEMO_APP = "wsgi_app.demo:application"
# Default: the state folder's parent, i.e. the folder fcgi-finish runs in (./var).
Default = str | Callable[[Path], str]


@dataclass(frozen=True)
class Entry:
    """One setting: its KEY (the configuration file's and the environment's name), the
    converter that checks a value, its default (text, or computed from the state
    folder), its meaning, and its ``fcgi-finish`` flag."""

    key: str
    convert: Callable[[str], Any]
    default: Default
    help: str
    flag: str = ""
    metavar: str = "VALUE"
    group: str = "stack"  # stack, worker (FCGI_*) or deferred (DEFERRED_*)

    def default_for(self, state: Path) -> str:
        return self.default(state) if callable(self.default) else self.default


class SettingError(ValueError):
    """A setting the stack cannot take; the message names it and the fix."""


def app_spec(text: str) -> str:
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise ValueError("must be MODULE:CALLABLE, as in mysite.wsgi:application")
    return text


def listen_address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if text.startswith("unix:") or not sep or not host:
        raise ValueError("must be HOST:PORT, as in 127.0.0.1:8080 (nginx listens on TCP)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must end in a port from 1 to 65535, as in {host}:8080")
    return text


def user(text: str) -> str:
    if not text:
        raise ValueError("must be a user")
    return user_name(text)


def any_text(text: str) -> str:
    return text


def folder(text: str) -> str:
    if not text:
        raise ValueError("must be a folder")
    return text


def proxies(text: str) -> tuple[str, ...]:
    """Addresses or networks (CIDR), comma-separated, as nginx's set_real_ip_from takes them."""
    import ipaddress

    out = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or a network") from None
            out.append(item)
    return tuple(out)


def default_run_user(state: Path) -> str:
    """Started as root: www-data where it exists, else nobody; otherwise yourself."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return "root"


def default_nginx(state: Path) -> str:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or "nginx"


STACK: tuple[Entry, ...] = (
    Entry(
        "APP",
        app_spec,
        DEMO_APP,
        "the WSGI application the workers serve, MODULE:CALLABLE, looked up in FCGI_CHDIR",
        metavar="MODULE:CALLABLE",
    ),
    Entry(
        "NUMPROCS",
        positive_int,
        "2",
        "worker processes in the pool (supervisord's numprocs); each runs FCGI_THREADS "
        "requests at once",
        "--workers",
        "N",
    ),
    Entry(
        "NGINX_LISTEN",
        listen_address,
        "127.0.0.1:8080",
        "where nginx listens, HOST:PORT (0.0.0.0:80 for everyone)",
        "--listen",
        "HOST:PORT",
    ),
    Entry(
        "STATIC_DIR",
        folder,
        lambda state: str(state / "static"),
        "the folder nginx serves at /static/ (Django's STATIC_ROOT, a Flask app's static folder)",
        "--static-dir",
        "DIR",
    ),
    Entry(
        "RUN_USER",
        user,
        default_run_user,
        "started as root, the workers and nginx's workers run as this user (default "
        "www-data, else nobody); root keeps root on purpose. Started as another user, that "
        "user",
        "--user",
        "USER",
    ),
    Entry(
        "NGINX_BIN",
        any_text,
        default_nginx,
        "the nginx binary (empty: the one found on PATH or in /usr/sbin at each start)",
        "--nginx",
        "PATH",
    ),
    Entry(
        "TLS_CERT",
        any_text,
        "",
        "a certificate (PEM, the chain after it): nginx serves HTTPS on NGINX_LISTEN with "
        "it and TLS_KEY (empty: plain HTTP)",
        "--tls-cert",
        "FILE",
    ),
    Entry("TLS_KEY", any_text, "", "the private key of TLS_CERT (PEM)", "--tls-key", "FILE"),
    Entry(
        "TRUSTED_PROXIES",
        proxies,
        "",
        "load balancers in front of nginx, addresses or networks, comma-separated: from "
        "them nginx takes the client's address from X-Forwarded-For and the scheme from "
        "X-Forwarded-Proto, and passes them to the app (REMOTE_ADDR, wsgi.url_scheme)",
        "--trusted-proxies",
        "ADDRS",
    ),
)

# Worker options the stack sets itself, and why (what to give instead).
FIXED = {
    "bind": "the pool's socket is supervisord's (STATE/run/app.sock)",
    "user": "the workers' user is RUN_USER: give RUN_USER=... (or --user)",
    "scoreboard": "the pool's scoreboard is STATE/run/scoreboard",
    "status_path": "the status page is /fcgi-status (nginx lets 127.0.0.1 reach it)",
    "ping_path": "the health check is /fcgi-ping",
    "access_log": "the access log is STATE/log/access.log",
}
# Worker options whose default in the stack differs from the worker's own.
STACK_DEFAULTS: dict[str, Default] = {
    "chdir": lambda state: str(state.parent),
}


def _worker_entries() -> tuple[Entry, ...]:
    rows = []
    for opt in OPTIONS:
        if opt.name in FIXED:
            continue
        if opt.name in STACK_DEFAULTS:
            default = STACK_DEFAULTS[opt.name]
        elif opt.default in (None, frozenset(), ()):
            default = ""
        elif opt.name == "socket_mode":
            default = f"{opt.default:o}"
        else:
            default = str(opt.default)
        help_ = opt.help
        if opt.name == "chdir":
            help_ += "; in the stack, default: the folder above the state folder"
        if opt.name == "cpu_affinity":
            help_ += "; in the stack, default: each worker its index (app_00 the first CPU)"
            default = ""
        rows.append(Entry(opt.env, opt.convert, default, help_, opt.flag, opt.metavar, "worker"))
    return tuple(rows)


def _deferred_entries() -> tuple[Entry, ...]:
    rows = []
    for setting in SETTINGS:
        default: Default = str(setting.default)
        if isinstance(setting.default, bool):
            default = "1" if setting.default else "0"
        if setting.name == "journal":
            default = lambda state: str(state / "lib" / "deferred.sqlite3")  # noqa: E731
            help_ = setting.help + "; in the stack, default: STATE/lib/deferred.sqlite3"
        else:
            help_ = setting.help
        flag = "--deferred-" + setting.name.replace("_", "-")
        if flag in {opt.flag for opt in OPTIONS}:  # the worker's (--deferred-timeout)
            flag = ""
        rows.append(
            Entry(setting.env, setting.convert, default, help_, flag, setting.metavar, "deferred")
        )
    return tuple(rows)


ENTRIES: tuple[Entry, ...] = STACK + _worker_entries() + _deferred_entries()
BY_KEY: dict[str, Entry] = {e.key: e for e in ENTRIES}
# Names the worker uses between its own processes, never settings.
INTERNAL = frozenset({"FCGI_HANDOVER", "FCGI_REQUEST_SEQ", "FCGI_CPUS", "FCGI_PYTHON"})
_FIXED_KEYS = {opt.env: FIXED[opt.name] for opt in OPTIONS if opt.name in FIXED}


def is_setting_name(key: str) -> bool:
    """A name this stack reads from the environment (the namespaced ones only)."""
    return key.startswith(("FCGI_", "DEFERRED_")) and key not in INTERNAL


def check_key(key: str) -> Entry:
    """The row of ``key``; an unknown or stack-owned name is refused, naming the fix."""
    entry = BY_KEY.get(key)
    if entry is not None:
        return entry
    if key in _FIXED_KEYS:
        raise SettingError(f"{key} is set by the stack: {_FIXED_KEYS[key]}")
    near = difflib.get_close_matches(key, list(BY_KEY), n=1, cutoff=0.6)
    hint = f": did you mean {near[0]}?" if near else ""
    raise SettingError(f"unknown setting {key}{hint} (fcgi-finish --help lists every setting)")


def check_value(entry: Entry, value: str) -> None:
    """Refuse a value the setting cannot take, naming it, the value and the form expected."""
    try:
        entry.convert(value)
    except ValueError as exc:
        raise SettingError(
            f"{entry.key}={value!r}{_flag(entry)}: {_why(exc, value)}; expected "
            f"{entry.metavar}: {meaning(entry.help)}"
        ) from None


def _flag(entry: Entry) -> str:
    return f" ({entry.flag})" if entry.flag else ""


def _why(exc: ValueError, value: str) -> str:
    text = str(exc)
    if text.startswith("invalid literal for int()"):
        return f"{value!r} is not a whole number"
    if text.startswith("could not convert string to float"):
        return f"{value!r} is not a number"
    return text if text.startswith(repr(value)) else f"{value!r} {text}"


def meaning(text: str) -> str:
    """The help's first clause whole (up to its first ";"), its asides in parentheses left
    out: an error's "expected" part, never a phrase cut where an aside began."""
    return re.sub(r"\s*\([^()]*\)", "", text).split(";")[0].strip()


def stop_wait(graceful: str) -> int:
    """supervisord's stopwaitsecs: longer than the workers' graceful timeout."""
    return int(seconds(graceful or "30")) + 10


# Settings that name a file or folder: given on a command line, made absolute.
PATH_KEYS = ("STATIC_DIR", "FCGI_CHDIR", "TLS_CERT", "TLS_KEY", "DEFERRED_JOURNAL")
