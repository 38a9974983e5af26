"""The worker's options, declared once as a flat table.

Each row gives the name, the converter that validates a value, the default
and the help text. The same table builds ``--help``, reads ``FCGI_<NAME>``
environment variables and fills the ``Options`` object; a bad value is an
error that names the option.
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from .affinity import cpu_choice


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number of seconds above 0")
    return value


def seconds_or_off(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be a number of seconds, or 0 for off")
    return value


def size(text: str) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    value = int(text[:-1] if factor > 1 else text) * factor
    if value < 1:
        raise ValueError("must be a size of 1 byte or more")
    return value


def file_mode(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError("must be an octal mode such as 660")
    return value


def bind_address(text: str) -> str:
    if text.startswith("unix:"):
        if not text[5:]:
            raise ValueError("unix: needs a path, as in unix:var/run/app.sock")
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be unix:PATH or HOST:PORT, as in 127.0.0.1:9000")
    return text


def mount_point(text: str) -> str:
    text = text.rstrip("/")
    if text and not text.startswith("/"):
        raise ValueError("must be empty (the root) or start with /, as in /app")
    return text


def url_path(text: str) -> str:
    if text and not text.startswith("/"):
        raise ValueError("must be a URL path starting with /, as in /fcgi-status")
    return text


def check_target(text: str) -> str:
    """A path (/health), or a URL (http://example.com/health) whose host is sent."""
    if text and not text.startswith("/") and not text.startswith(("http://", "https://")):
        raise ValueError("must be a path such as /health, or a URL such as http://example.com/")
    return text


def address_list(text: str) -> frozenset[str]:
    """Comma-separated IP addresses, as FCGI_WEB_SERVER_ADDRS has them."""
    addresses = {a.strip() for a in text.split(",") if a.strip()}
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address") from None
    return frozenset(addresses)


def group_name(text: str) -> str:
    if text:
        try:
            grp.getgrnam(text)
        except KeyError:
            raise ValueError("is not a group on this machine (see getent group)") from None
    return text


def choice(*names: str) -> Callable[[str], str]:
    """A converter that accepts one of ``names`` (case-insensitive)."""

    def convert(text: str) -> str:
        if text.lower() not in names:
            raise ValueError("must be one of " + ", ".join(names))
        return text.lower()

    return convert


def path_list(text: str) -> tuple[str, ...]:
    """Folders separated by commas (or os.pathsep), as gunicorn's --pythonpath takes them;
    relative ones are relative to --chdir."""
    parts = text.replace(os.pathsep, ",").split(",")
    return tuple(p.strip() for p in parts if p.strip())


def user_name(text: str) -> str:
    if text:
        try:
            pwd.getpwnam(text)
        except KeyError:
            raise ValueError("is not a user on this machine (see getent passwd)") from None
    return text


def log_level(text: str) -> str:
    levels = ("debug", "info", "warning", "error")
    if text.lower() not in levels:
        raise ValueError("must be one of " + ", ".join(levels))
    return text.lower()


@dataclass(frozen=True)
class Option:
    name: str
    convert: Callable[[str], Any]
    default: Any
    help: str
    metavar: str = "N"
    env_name: str = ""  # when the variable is not FCGI_<NAME>

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.env_name or "FCGI_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "bind",
        bind_address,
        None,
        "where to listen: unix:PATH or HOST:PORT. Default: the "
        "listening socket on fd 0, as supervisor's [fcgi-program] and spawn-fcgi hand it",
        "ADDRESS",
    ),
    Option(
        "threads",
        positive_int,
        1,
        "requests run at once in this process; idle and "
        "slow connections take none (scale across cores with more processes)",
    ),
    Option(
        "socket_mode",
        file_mode,
        0o660,
        "permissions of a unix socket this worker creates, "
        "in octal; 660 lets the web server's group connect",
        "MODE",
    ),
    Option("backlog", positive_int, 1024, "listen backlog of a socket this worker creates"),
    Option(
        "max_detached",
        non_negative_int,
        16,
        "requests that may go on running after "
        "fcgi.finish_request (PHP style) without holding one of --threads; beyond it they "
        "hold one",
    ),
    Option(
        "spool_threshold",
        size,
        1 << 20,
        "request bodies larger than this go to a "
        "temporary file instead of memory (K, M, G suffixes)",
        "BYTES",
    ),
    Option(
        "max_params",
        size,
        1 << 20,
        "largest params (headers) a request may send; more closes the connection",
        "BYTES",
    ),
    Option(
        "write_timeout",
        seconds,
        60.0,
        "seconds the web server may read nothing of a response before its connection is "
        "closed; a limit per stall, not per response: each read starts it again",
        "SECONDS",
    ),
    Option(
        "graceful_timeout",
        seconds,
        30.0,
        "on SIGTERM or a reload, seconds to finish running requests and accepted deferred "
        "work before exiting (or exec'ing)",
        "SECONDS",
    ),
    Option(
        "read_timeout",
        seconds,
        30.0,
        "seconds a record or a request may stay half-sent before its connection is closed "
        "(idle kept-alive connections never time out)",
        "SECONDS",
    ),
    Option(
        "max_connections",
        positive_int,
        4096,
        "connections held at once; at the limit the least recently used idle one is closed "
        "to admit a new one, and only when none is idle do new ones wait in the listen backlog",
    ),
    Option(
        "max_requests",
        non_negative_int,
        0,
        "recycle: after this many requests reload in place as on SIGHUP (check the code "
        "imports, drain, exec a fresh interpreter in the same process keeping the listening "
        "socket and the kept-alive connections), so the supervisor sees no exit (0: never)",
    ),
    Option(
        "max_requests_jitter",
        non_negative_int,
        0,
        "add a random 0..N to --max-requests, so a pool's workers do not recycle together",
    ),
    Option(
        "slow_request",
        seconds_or_off,
        0.0,
        "log the stack of a request still running after this many seconds (0: off)",
        "SECONDS",
    ),
    Option(
        "request_timeout",
        seconds_or_off,
        0.0,
        "give up on a request still running after this many seconds, as PHP-FPM's "
        "request_terminate_timeout: its stack is logged, the web server gets 504 (a cut "
        "connection if the response had begun), and once the other requests and deferred "
        "work have drained the worker reloads in place, which ends the stuck thread; "
        "counted on the status page. Work after fcgi.finish_request counts; deferred calls "
        "have --deferred-timeout (0: off)",
        "SECONDS",
    ),
    Option(
        "slow_deferred",
        seconds_or_off,
        0.0,
        "log the stack of a deferred callable still running after this many seconds; offered "
        "to the middleware as environ['fcgi.deferred_limits'] (0: off)",
        "SECONDS",
    ),
    Option(
        "deferred_timeout",
        seconds_or_off,
        0.0,
        "cancel (and log) a deferred coroutine still running after this many seconds; plain "
        "functions cannot be cancelled and are only slow-logged (0: off)",
        "SECONDS",
    ),
    Option(
        "mount",
        mount_point,
        "",
        "URL prefix the app is mounted at: SCRIPT_NAME becomes "
        "this and PATH_INFO the rest of the path, whatever the web server sent "
        "(default: the root)",
        "PREFIX",
    ),
    Option(
        "socket_group",
        group_name,
        "",
        "group to give a unix socket this worker creates, e.g. www-data, so a web server in "
        "that group can connect with --socket-mode 660",
        "GROUP",
    ),
    Option(
        "allow",
        address_list,
        frozenset(),
        "for a TCP bind: the web servers' addresses allowed to connect, comma-separated; "
        "others are closed and logged (the FastCGI spec's FCGI_WEB_SERVER_ADDRS)",
        "ADDRS",
        "FCGI_WEB_SERVER_ADDRS",
    ),
    Option(
        "status_path",
        url_path,
        "",
        "answer this path with the pool's status (PHP-FPM's fields; ?json, ?openmetrics, "
        "?full) without calling the app (default: off)",
        "PATH",
    ),
    Option(
        "ping_path",
        url_path,
        "",
        "answer this path with --ping-response without calling the app, for health checks "
        "(default: off)",
        "PATH",
    ),
    Option("ping_response", str, "pong", "the body of the ping answer", "TEXT"),
    Option(
        "scoreboard",
        str,
        "",
        "folder where the pool's workers share their status slots, e.g. var/run/scoreboard "
        "(default: a private one, so the status page shows this worker only)",
        "DIR",
    ),
    Option("pool_name", str, "app", "the pool's name on the status page", "NAME"),
    Option(
        "access_log",
        str,
        "",
        "write one line per request, when its response is finished, to this file (- for "
        "stderr); SIGUSR1 reopens it (default: off)",
        "PATH",
    ),
    Option(
        "access_log_format",
        str,
        '{time} {pid} {remote} "{method} {uri}" {status} {bytes} {ms}ms '
        "deferred={deferred} id={id}",
        "the access log line: combined (nginx's combined format, then the response time "
        "and request id), json (one JSON object per line), or a template with fields {time} "
        "{pid} {remote} {method} {uri} {protocol} {status} {bytes} (body bytes sent) {ms} "
        "(response time) {referer} {agent} {deferred} (callables registered) {id} (request "
        "id, also on the line written when its deferred work ends); every value is escaped",
        "FORMAT",
    ),
    Option("log_level", log_level, "info", "debug, info, warning or error", "LEVEL"),
    Option(
        "log_format",
        choice("text", "json"),
        "text",
        "the worker's own log lines on stderr: text, or json (one JSON object per line); "
        "an app's LOGGING never changes them",
        "FORMAT",
    ),
    Option(
        "chdir",
        str,
        "",
        "change to this folder before loading the app, as gunicorn's --chdir (the app's "
        "module is then looked up there first)",
        "DIR",
    ),
    Option(
        "user",
        user_name,
        "",
        "when started as root: become this user (and its group) after taking the socket, "
        "before loading the app, as PHP-FPM's pool user; staying root takes --user root, "
        "and logs a warning",
        "USER",
    ),
    Option(
        "cpu_affinity",
        cpu_choice,
        "auto",
        "bind the worker to one CPU, so its threads hand the GIL over on one core (a "
        "deferred call's thread on another core costs the serving thread several times the "
        "call's work): auto claims one no other worker of the pool holds (a lock per CPU in "
        "the pool's scoreboard folder; unbound when it cannot make one), N the Nth allowed "
        "(modulo their number), off leaves the process free to move (for an app whose "
        "threads run C code in parallel, e.g. numpy)",
        "CPU",
    ),
    Option(
        "reload_check_path",
        check_target,
        "",
        "on a reload, the child that imports the new code also calls it once with a GET of "
        "this path (or URL, whose host is sent, for Django's ALLOWED_HOSTS), and the new "
        "code is refused if that raises or answers 5xx: Django imports its views only "
        "then. Choose a page with no side effects (default: import only)",
        "PATH",
    ),
    Option(
        "pythonpath",
        path_list,
        (),
        "folders to put at the front of sys.path before loading the app, comma-separated, "
        "relative to --chdir, as gunicorn's --pythonpath, e.g. src,/srv/lib",
        "DIRS",
    ),
)


class Options:
    """The validated settings of one worker; attributes are the table's names, declared
    here with their types (the table's converters return them)."""

    app: str
    bind: str | None
    threads: int
    socket_mode: int
    backlog: int
    max_detached: int
    spool_threshold: int
    max_params: int
    write_timeout: float
    graceful_timeout: float
    read_timeout: float
    max_connections: int
    max_requests: int
    max_requests_jitter: int
    slow_request: float
    request_timeout: float
    slow_deferred: float
    deferred_timeout: float
    mount: str
    socket_group: str
    allow: frozenset[str]
    status_path: str
    ping_path: str
    ping_response: str
    scoreboard: str
    pool_name: str
    access_log: str
    access_log_format: str
    log_level: str
    log_format: str
    chdir: str
    user: str
    pythonpath: tuple[str, ...]
    reload_check_path: str
    cpu_affinity: str | int

    def __init__(self, **values: Any) -> None:
        for opt in OPTIONS:
            setattr(self, opt.name, values.pop(opt.name, opt.default))
        self.app = values.pop("app", "")
        if values:
            raise TypeError(f"unknown options: {', '.join(values)}")

    @classmethod
    def parse(cls, argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Options:
        """Options from the command line, else the environment, else the table's default;
        exits with usage on errors. Each value is converted once: argparse never sees a
        default (it would run ``type`` again on a string one)."""
        parser = build_parser()
        values = vars(parser.parse_args(argv))
        for opt in OPTIONS:
            if opt.name not in values and opt.env in environ:
                try:
                    values[opt.name] = opt.convert(environ[opt.env])
                except ValueError as exc:
                    parser.error(f"environment variable {opt.env}={environ[opt.env]!r}: {exc}")
        return cls(**values)


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return opt.convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None

    convert.__name__ = opt.name
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcgi-serve",
        description="Serve a WSGI application over FastCGI, with environ['fcgi.finish_request'] "
        "to end the response early (PHP's fastcgi_finish_request).",
        epilog="Every option can also be set with the environment variable shown with it, e.g. "
        "FCGI_THREADS=4; the command line wins. Signals: TERM/INT stop gracefully, QUIT at "
        "once, HUP/USR2 reload in place (same pid, socket and connections), USR1 reopens "
        "the access log.",
    )
    parser.add_argument("--version", action="version", version=f"fcgi-serve {__version__}")
    parser.add_argument(
        "app",
        metavar="MODULE:CALLABLE",
        help="the WSGI application, e.g. mysite.wsgi:application or wsgi_app.demo:application",
    )
    for opt in OPTIONS:
        shown = f"{opt.default:o}" if opt.name == "socket_mode" else opt.default
        default = f"; default: {shown}" if opt.default not in (None, "", frozenset(), ()) else ""
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            type=_argparse_type(opt),
            default=argparse.SUPPRESS,  # absent: the environment or the table fills it
            metavar=opt.metavar,
            help=f"{opt.help} (env {opt.env}{default})",
        )
    return parser
