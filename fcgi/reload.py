"""Reload in place: a fresh interpreter in the same process, with the same sockets.

SIGHUP, SIGUSR2 and ``--max-requests`` recycling end here. The new code is first
imported in a child process (``check_app``), which with ``--reload-check-path``
also calls it once with a GET of that path (``try_request``: Django imports its
views only then): if that fails, the old code keeps serving and the traceback is
logged and recorded in the scoreboard, where ``fcgi-finish reload`` reads it.
Otherwise the server drains (no new requests; those in flight and their deferred
work finish), then ``exec_in_place``
clears FD_CLOEXEC on the listening socket and on the kept-alive connections and
``exec``s the same command line, describing those fds in ``HANDOVER_ENV`` (as
gunicorn hands its listeners over in ``GUNICORN_FD``). The new interpreter
adopts them (``take_handover``). The pid stays, so supervisord sees no exit,
and the web server sees no connection close: bytes it sends meanwhile wait in
the kernel's buffers.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .io.loop import KeptConnection

log = logging.getLogger("fcgi")

HANDOVER_ENV = "FCGI_HANDOVER"
CHECK_TIMEOUT = 60.0  # seconds the new code may take to import in the check

# Blocked across exec (the mask survives it) so none lands before the new interpreter
# has its handlers: SIGHUP's default action would kill the process.
HELD_SIGNALS = frozenset(
    (
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGALRM,  # an alarm the app set survives exec: due before the handlers
    )
)

# The check ends itself with os._exit once it has its answer: an app may start, as it
# is imported, threads that never end (a scheduler, a pool's keep-alive) or children
# that outlive it; neither may hold a reload. It also ends once the worker is gone (a
# stop during the check): its time limit is kept by the worker, and an import that
# hangs would otherwise run on as an orphan. A check that passed says so in a last line
# of its own (PASSED): with SIGCHLD ignored (an app may), the kernel reaps the child and
# Python reads its exit status as 0, whatever it was.
PASSED = "fcgi-serve: the reload check passed"
_CHECK = """\
import os, sys, threading, time, traceback

def _orphaned(worker):
    while os.getppid() == worker:
        time.sleep(0.2)
    os.killpg(0, 9)  # this check and what the app started in it: SIGKILL

threading.Thread(target=_orphaned, args=(int(sys.argv[1]),), daemon=True).start()
from fcgi.cli import AppLoadError, load_app, setup_path
from fcgi.reload import PASSED, try_request
code = 0
try:
    setup_path("", sys.argv[4:])  # the folder is inherited; --pythonpath is not
    app = load_app(sys.argv[2])
except AppLoadError as exc:
    traceback.print_exception(exc.__cause__ or exc)
    code = 1
else:
    failure = try_request(app, sys.argv[3]) if sys.argv[3] else None
    if failure:
        print(failure, file=sys.stderr)
        code = 1
if code == 0:
    print("\\n" + PASSED)
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


@dataclass
class Handover:
    """What one interpreter hands the next: its listening socket and connections."""

    listen_fd: int
    path: str | None = None  # the unix socket file to remove at a real exit
    conns: list[KeptConnection] = field(default_factory=list)
    scoreboard: str = ""  # a private status folder, kept with its figures for the next one

    def encode(self) -> str:
        return json.dumps(
            {
                "listen": self.listen_fd,
                "path": self.path,
                "conns": [
                    [c.fd, base64.b64encode(c.buffered).decode(), c.fresh, c.ended]
                    for c in self.conns
                ],
                "scoreboard": self.scoreboard,
            }
        )

    @classmethod
    def decode(cls, text: str) -> Handover:
        data = json.loads(text)
        conns = [
            KeptConnection(int(fd), base64.b64decode(buf), bool(fresh), [int(i) for i in ended])
            for fd, buf, fresh, ended in data["conns"]
        ]
        return cls(int(data["listen"]), data["path"], conns, str(data.get("scoreboard", "")))


def take_handover(environ: dict[str, str] | os._Environ[str] = os.environ) -> Handover | None:
    """The sockets the previous interpreter of this process left us, if any (the
    variable is removed, so a child never takes them for its own)."""
    text = environ.pop(HANDOVER_ENV, None)
    if not text:
        return None
    try:
        return Handover.decode(text)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s is not a valid hand-over (%s); ignored", HANDOVER_ENV, exc)
        return None


def try_request(app: Callable[..., Any], target: str) -> str | None:
    """Call ``app`` once, in this process, with a GET of ``target`` (a path, or a URL
    whose host is sent as Host, for Django's ALLOWED_HOSTS); None if it answered below
    500, else why not, with the traceback it raised or logged."""
    url = urlsplit(target)
    host = url.netloc or "localhost"
    name, _, port = host.partition(":")
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": url.path or "/",
        "QUERY_STRING": url.query,
        "SERVER_NAME": name,
        "SERVER_PORT": port or ("443" if url.scheme == "https" else "80"),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host,
        "HTTP_USER_AGENT": "fcgi-serve reload check",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url.scheme or "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    logged = _Errors()
    logging.getLogger().addHandler(logged)  # Django logs a view's exception, answers 500
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[..., None]:
        statuses.append(status)
        return lambda data: None

    try:
        result = app(environ, start_response)
        try:
            for _ in result:
                pass
        finally:
            if hasattr(result, "close"):
                result.close()
    except BaseException:
        return f"GET {target} raised:\n{traceback.format_exc().rstrip()}"
    finally:
        logging.getLogger().removeHandler(logged)
    if not statuses:
        return f"GET {target}: the app returned without calling start_response"
    if not statuses[-1][:1].isdigit() or int(statuses[-1][:3]) >= 500:
        shown = "\n".join(logged.lines) or "(the app logged no traceback)"
        return f"GET {target} answered {statuses[-1]}:\n{shown}"
    return None


class _Errors(logging.Handler):
    """What the app logs at ERROR during the check request, tracebacks included."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def check_app(
    app: str,
    pythonpath: Sequence[str] = (),
    check_path: str = "",
    timeout: float = CHECK_TIMEOUT,
    folder: str | None = None,
) -> str | None:
    """Import ``app`` (MODULE:CALLABLE) in a child process with this process's
    environment, ``--pythonpath`` and interpreter, in ``folder`` (the one the app was
    loaded from, ``--chdir`` applied: the app may have changed the process's since), and
    with ``check_path`` call it once there (``try_request``); None if it loads (and
    answers), else what it printed."""
    env = {k: v for k, v in os.environ.items() if k != HANDOVER_ENV}
    # its output goes to a file, not a pipe: a child the app started may keep a pipe
    # open long after the check has ended, and reading it to its end would wait for it
    with tempfile.TemporaryFile() as out:
        try:
            check = subprocess.Popen(
                [sys.executable, "-c", _CHECK, str(os.getpid()), app, check_path, *pythonpath],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=folder,
                # a session of its own: a stop sent to the worker's process group
                # (supervisord's stopasgroup, Ctrl-C) is the worker's to act on; it
                # killed the check, which then read as broken code. The check still
                # ends with the worker (its watch on its parent)
                start_new_session=True,
            )
        except OSError as exc:
            return f"cannot start {sys.executable}: {exc}"
        try:
            returncode = check.wait(timeout)
        except subprocess.TimeoutExpired:
            return f"importing {app} took over {timeout:.0f} s"
        finally:
            _end_group(check)
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
    lines = text.splitlines()
    if returncode == 0 and PASSED in lines:
        return None
    if returncode == 0:  # (an exit status read as 0: SIGCHLD ignored)
        return text or "the check ended without its verdict"
    return text or f"exit status {returncode}"


def _end_group(check: subprocess.Popen) -> None:
    """End the check and whatever the app started in it as it was imported: out of the
    worker's process group, a stop of the pool would no longer reach them."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # none left
        os.killpg(check.pid, signal.SIGKILL)
    check.wait()


def exec_in_place(handover: Handover) -> None:
    """Become a fresh interpreter with the same command line, keeping the fds."""
    for fd in [handover.listen_fd, *(c.fd for c in handover.conns)]:
        os.set_inheritable(fd, True)
    os.environ[HANDOVER_ENV] = handover.encode()
    log.info(
        "restarting in place with a fresh interpreter, keeping %d connection(s)",
        len(handover.conns),
    )
    # The old interpreter ends here as an exit would end it: what the app registered
    # with atexit runs (a journal says which of its calls ended, and that the ones its
    # drain cut were not at fault); exec runs none of it.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    hold_signals()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def hold_signals() -> None:
    """Block what the next interpreter's handlers take over (``release_signals``)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def release_signals() -> None:
    """Unblock what ``exec_in_place`` held, once the handlers are installed: a signal
    sent during the exec is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
