from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcgi.listener import open_listener
from fcgi.options import Options
from fcgi.server import Server
from tests.fcgi_client import Client


class Running:
    """An in-process server on a unix socket, and a way to open clients to it."""

    def __init__(self, server: Server, path: Path) -> None:
        self.server = server
        self.path = path
        self.clients: list[Client] = []

    def client(self) -> Client:
        client = Client(str(self.path))
        self.clients.append(client)
        return client


@contextlib.contextmanager
def served(app, path: Path, **options) -> Iterator[Running]:
    """``Server(app)`` on a unix socket at ``path``, in a thread; stopped and checked on exit."""
    opts = Options(bind=f"unix:{path}", **options)
    server = Server(app, opts, open_listener(opts.bind))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    running = Running(server, path)
    try:
        yield running
    finally:
        for client in running.clients:
            client.close()
        server.stop()
        thread.join(10)
        assert not thread.is_alive(), "server thread did not stop"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start servers for the test; each is stopped (and checked stopped) afterwards."""
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:
        yield lambda app, **options: stack.enter_context(
            served(app, tmp_path / f"s{next(numbers)}.sock", **options)
        )
