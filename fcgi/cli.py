"""``fcgi-serve`` / ``python -m fcgi``: options in, app loaded, socket bound, server run.

Every failure a user can fix (bad option, app that does not import, socket
that cannot be bound) ends with one line on stderr that says how, and exit
status 2.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .listener import Listener, ListenError, open_listener
from .options import Options
from .reload import exec_in_place, take_handover
from .server import Server

EXIT_USAGE = 2


class AppLoadError(Exception):
    """MODULE:CALLABLE does not name a WSGI application; the message says why."""


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
                "holds it, or add that folder to PYTHONPATH"
            ) from None
        raise AppLoadError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise AppLoadError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        app = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise AppLoadError(
            f"module {module_name!r} has no {attr!r}; check the name after the colon"
        ) from None
    if not callable(app):
        raise AppLoadError(f"{spec} is a {type(app).__name__}, not a WSGI callable")
    return app


def main(argv: Sequence[str] | None = None) -> int:
    options = Options.parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handover = take_handover()  # this process's previous interpreter, after a reload
    try:
        app = load_app(options.app)
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
        server = Server(app, options, listener)
    except (ValueError, OSError) as exc:
        listener.close()
        print(f"fcgi-serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if handover is not None:
        for kept in handover.conns:
            server.loop.adopt(kept)
    server.install_signals()
    code = server.serve()
    if server.handover is not None:
        # The listening socket stays open across exec, so connections wait in its
        # backlog meanwhile, and supervisord sees no exit: its reference to the pool's
        # socket never drops to zero, which would close the socket for the whole pool.
        exec_in_place(server.handover)
    return code
