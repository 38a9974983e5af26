from __future__ import annotations

import contextlib
import faulthandler
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcgi.io.listener import open_listener
from fcgi.options import Options
from fcgi.server import Server
from tests.fcgi_client import Client

# pytest-timeout (120 s, pyproject.toml) fails a stuck test by a signal, which only lands
# when the main thread runs Python. Past this limit a C-level watchdog dumps every thread's
# stack and ends the run, so a hang anywhere costs minutes, not the whole CI budget.
HARD_LIMIT = 300.0
_stderr_key = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    # fd 2 is not captured yet here; tests run with it redirected to a capture file.
    config.stash[_stderr_key] = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    stderr = item.config.stash[_stderr_key]
    faulthandler.dump_traceback_later(HARD_LIMIT, exit=True, file=stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


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


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users (the workers' www-data) may traverse: tmp_path is 0700."""
    path = Path(tempfile.mkdtemp(prefix="fcgi-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
