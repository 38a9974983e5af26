from __future__ import annotations

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


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start ``Server(app)`` in a thread; stopped (and checked stopped) after the test."""
    started: list[tuple[Running, threading.Thread]] = []

    def start(app, **options) -> Running:
        path = tmp_path / f"s{len(started)}.sock"
        opts = Options(bind=f"unix:{path}", **options)
        server = Server(app, opts, open_listener(opts.bind))
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        running = Running(server, path)
        started.append((running, thread))
        return running

    yield start
    for running, thread in started:
        for client in running.clients:
            client.close()
        running.server.stop()
        thread.join(10)
        assert not thread.is_alive(), "server thread did not stop"
