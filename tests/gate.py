"""A gate: work under test (an app, a deferred call, in any process) waits at it until
the test opens it. "The visitor had the page while the deferred work was still
running" is then an order of events, not a stopwatch reading that a busy machine
spoils.

The gate is a listening unix socket: ``wait_at(path)`` connects and blocks reading;
``Gate.open()`` closes the socket, which wakes every waiter at once. A gate that is
open already (or never was) lets the waiter through.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


class Gate:
    """A closed gate at ``path``; ``open()`` lets everything waiting at it go on."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(1024)
        self._open = False

    def open(self) -> None:
        if not self._open:
            self._open = True
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                Path(self.path).unlink()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()


def wait_at(path: str) -> None:
    """Block until the gate at ``path`` opens; return at once if it is not closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            sock.recv(1)
        except OSError:  # no gate there, or opened: a reset wakes us
            return
