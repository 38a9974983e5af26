"""``fcgi-serve`` / ``python -m fcgi``: options in, socket bound, user dropped, app loaded,
server run.

Every failure a user can fix (bad option, module not found, socket that cannot
be bound) ends with one line on stderr that says how, and exit status 2. An app
that raises while it loads gets its full traceback on stderr, as gunicorn
prints it, and the same exit status at once: supervisord's log shows it and
``make start`` fails in seconds. An exception raised while the app loads that
has a true ``setup_error`` attribute is a setting the user can fix (the
deferred-work middleware's settings, a journal the worker cannot write): its
message alone, one line, exit status 2. The attribute is the whole contract: the
worker imports nothing of the app's libraries.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import importlib
import logging
import os
import pwd
import signal
import socket
import stat
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import affinity
from .io.listener import Listener, ListenError, open_listener
from .ops import logs
from .ops.scoreboard import pool_folder, runtime_dir
from .options import Options
from .reload import Handover, exec_in_place, release_signals, take_handover
from .server import Server

EXIT_USAGE = 2


class AppLoadError(Exception):
    """MODULE:CALLABLE does not name a WSGI application; the message says why."""


class AppRaised(AppLoadError):
    """Importing the app's module raised: the app's own bug, shown with its traceback."""


class UserError(Exception):
    """--user cannot be applied; the message says why."""


def setup_path(chdir: str, pythonpath: Sequence[str]) -> None:
    """gunicorn's meanings: ``--chdir`` changes the folder before the app loads and puts it
    first on sys.path; ``--pythonpath`` folders go in front of that, in the order given."""
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise AppLoadError(f"--chdir {chdir}: {exc.strerror}") from None
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for folder in map(os.path.abspath, reversed(pythonpath)):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)


def load_app(spec: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"{spec!r} is not MODULE:CALLABLE, e.g. wsgi_app:application")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(
                f"cannot import module {module_name!r}: run from the folder that "
                "holds it, or give that folder with --chdir or --pythonpath"
            ) from None
        raise AppRaised(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise AppRaised(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        app = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise AppLoadError(
            f"module {module_name!r} has no {attr!r}; check the name after the colon"
        ) from None
    except Exception as exc:  # a module __getattr__ that imports lazily (the demo's)
        raise AppRaised(f"loading {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not callable(app):
        raise AppLoadError(f"{spec} is a {type(app).__name__}, not a WSGI callable")
    return app


class _Stopped(BaseException):  # not Exception: load_app must not catch it
    """SIGTERM or SIGINT arrived while the app was loading."""


def _stop_while_starting(signum: int, frame: Any) -> None:
    raise _Stopped


class _Starting:
    """The handlers from main's first line until the server's own are in: TERM and INT
    end the worker cleanly (``_Stopped``); HUP, USR2, USR1 and ALRM, whose default
    actions would end it, are noted and acted on once it serves."""

    HELD = (signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1, signal.SIGALRM)

    def __init__(self) -> None:
        self.asked: list[int] = []
        signal.signal(signal.SIGTERM, _stop_while_starting)
        signal.signal(signal.SIGINT, _stop_while_starting)
        for sig in self.HELD:
            signal.signal(sig, self.note)

    def note(self, signum: int, frame: Any) -> None:
        self.asked.append(signum)

    def hand_over(self, server: Server) -> None:
        """Install the server's handlers in place of these (SIGALRM's too, unless the app
        set its own while it loaded)."""
        server.install_signals()
        if signal.getsignal(signal.SIGALRM) == self.note:
            signal.signal(signal.SIGALRM, server.handle_alarm)
        else:  # the app set its own as it loaded: an alarm before that is not for it
            self.asked = [sig for sig in self.asked if sig != signal.SIGALRM]

    def replay(self, server: Server) -> None:
        """Act on what came while starting: a HUP or USR2 is a reload (the code may have
        changed while it loaded), a USR1 reopens the access log, an ALRM gets the
        server's one warning."""
        if signal.SIGALRM in self.asked:
            server.handle_alarm(signal.SIGALRM, None)
        if signal.SIGUSR1 in self.asked:
            server.handle_usr1(signal.SIGUSR1, None)
        reloads = [sig for sig in self.asked if sig in (signal.SIGHUP, signal.SIGUSR2)]
        if reloads:
            server.reload(f"{signal.Signals(reloads[-1]).name} while starting")


def drop_privileges(user: str, socket_path: str | None = None) -> None:
    """Become ``user`` (its uid, group and supplementary groups) if started as root;
    stay root only when told so (``--user root``), with a warning either way. A unix
    socket this worker created is given to ``user`` first, so it can remove it at exit."""
    log = logging.getLogger("fcgi")
    if os.geteuid() != 0:
        if user and pwd.getpwnam(user).pw_uid != os.geteuid():
            raise UserError(f"--user {user}: only root can change user; this is uid {os.geteuid()}")
        return
    if not user:
        log.warning(
            "running the app as root: give --user (FCGI_USER), e.g. --user www-data, as "
            "PHP-FPM runs its pools; --user root keeps root on purpose"
        )
        return
    entry = pwd.getpwnam(user)
    if entry.pw_uid == 0:
        log.warning("running the app as root (--user %s), as asked", user)
        return
    try:
        if socket_path:
            os.chown(socket_path, entry.pw_uid, -1)
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise UserError(f"--user {user}: {exc}") from None
    closed = _closed_to_me(os.path.dirname(os.__file__))
    if closed:
        raise UserError(
            f"--user {user} cannot read this Python's standard library (at "
            f"{os.path.dirname(os.__file__)}): {closed} is closed to it; use a Python "
            f"{user} can read (e.g. /usr/bin/python3, or a virtualenv made from one), or "
            f"give --user a user that can"
        )
    group = grp.getgrgid(entry.pw_gid).gr_name
    log.debug("running as user %s, group %s", user, group)


def _closed_to_me(path: str) -> str:
    """The first folder on ``path``'s way this process may not enter, with its mode,
    or '' if it reaches ``path``: a user whose lazy imports would fail later."""
    folder = "/"
    for part in Path(path).parts[1:]:
        folder = os.path.join(folder, part)
        if not os.access(folder, os.R_OK | os.X_OK):
            try:
                return f"{folder} (mode {stat.S_IMODE(os.stat(folder).st_mode):o})"
            except OSError:
                return folder
    return ""


def cpu_pool(options: Options, listener: Listener) -> Path:
    """Where ``--cpu-affinity auto`` claims a CPU: the pool's folder (beside its
    scoreboard), or one folder for every worker of this user alone on its own socket."""
    folder = pool_folder(options.scoreboard, listener.sock, inherited=options.bind is None)
    return folder or Path(runtime_dir(), f"fcgi-cpus-{os.geteuid()}")


class _Exit(Exception):
    """The worker ends before it serves, with ``code`` (and ``message``, the fix)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _server(
    options: Options,
    listener: Listener,
    mask: set[signal.Signals],
    handover: Handover | None = None,
) -> Server:
    """Give the stop signals back (``mask``: blocked while the socket was made), bind to
    a CPU, become --user, load the app, make the server (``handover``: what this
    process's previous interpreter left it); ``_Exit`` when that fails."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # before any thread starts: they inherit it
        cpu = affinity.bind(options.cpu_affinity, cpu_pool(options, listener))
        if cpu is not None:
            logging.getLogger("fcgi").debug("bound to CPU %d (--cpu-affinity)", cpu)
        drop_privileges(options.user, listener.path)
        return Server(load_app(options.app), options, listener, handover)
    except AppRaised as exc:
        if getattr(exc.__cause__, "setup_error", False) is True:
            raise _Exit(EXIT_USAGE, str(exc.__cause__)) from None
        logging.getLogger("fcgi").error(
            "%s; the app's traceback:\n%s",
            exc,
            "".join(traceback.format_exception(exc.__cause__)).rstrip(),
        )
        raise _Exit(EXIT_USAGE) from None
    except (AppLoadError, UserError, ValueError, OSError) as exc:
        raise _Exit(EXIT_USAGE, str(exc)) from None
    except _Stopped:
        raise _Exit(0) from None


def main(argv: Sequence[str] | None = None) -> int:
    # First: no signal's default action may end the worker before it serves.
    starting = _Starting()
    try:
        # held across a reload's exec (reload.HELD_SIGNALS): the handlers above take them
        # now, and every thread the app starts as it loads, and its children, have none
        # blocked
        release_signals()
        return _main(argv, starting)
    except _Stopped:  # TERM/INT before the socket was made: nothing to close
        return 0


def _main(argv: Sequence[str] | None, starting: _Starting) -> int:
    options = Options.parse(sys.argv[1:] if argv is None else argv)
    logs.setup(options.log_level, options.log_format)
    handover = take_handover()  # this process's previous interpreter, after a reload
    start_dir = os.getcwd()  # where a relative --chdir starts from, after a reload too
    # A stop while the socket is made waits until the listener exists to be closed (its
    # file removed): the mask is given back at the top of the try that closes it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        setup_path(options.chdir, options.pythonpath)
        if handover is not None:
            listener = Listener(socket.socket(fileno=handover.listen_fd), handover.path)
        else:
            listener = open_listener(
                options.bind, options.socket_mode, options.backlog, options.socket_group
            )
    except (AppLoadError, ListenError) as exc:
        print(f"fcgi-serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = _server(options, listener, mask, handover)
    except _Exit as exc:  # the one way out before serving: the socket closed, one line
        with contextlib.suppress(OSError):
            listener.close()
        if exc.message:
            print(f"fcgi-serve: error: {exc.message}", file=sys.stderr)
        return exc.code
    if handover is not None:
        for kept in handover.conns:
            server.loop.adopt(kept)
    if handover is not None:  # before a HUP may begin the next check, which says "checking"
        server.reloaded()
    starting.hand_over(server)
    starting.replay(server)

    def reexec(handover: Handover) -> None:
        # The listening socket stays open across exec, so connections wait in its
        # backlog meanwhile, and supervisord sees no exit: its reference to the pool's
        # socket never drops to zero, which would close the socket for the whole pool.
        os.chdir(start_dir)
        exec_in_place(handover)

    served = threading.Event()
    threading.Thread(
        target=_exit_once_stopped, args=(server, served), name="fcgi-exit", daemon=True
    ).start()
    code = server.serve(reexec)
    served.set()
    return code


EXIT_GRACE = 1.0  # seconds serve() is given to return once the stop is over


def _exit_once_stopped(server: Server, served: threading.Event) -> None:
    """End the process once the stop is over, if this (the main) thread cannot: with
    --threads 1 it may be the one a request given up on (--request-timeout) still holds
    in the app, and it would hold the exit for as long as the app runs."""
    server.stopped.wait()
    if served.wait(EXIT_GRACE):
        return
    logging.getLogger("fcgi").error(
        "stopped; the main thread is still in the app (a request given up on), exiting %d",
        server.exit_code,
    )
    logging.shutdown()
    os._exit(server.exit_code)
