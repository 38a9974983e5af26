"""Requests the worker answers itself, without calling the app.

The pool status page (``--status-path``, backed by the shared scoreboard), the
health check (``--ping-path``), and 404 for paths outside ``--mount``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import status
from .scoreboard import Scoreboard

if TYPE_CHECKING:
    from ..wsgi.request import Request

Answer = Callable[["Request"], None]


class PageOptions(Protocol):
    """What the answers need of the worker's options."""

    status_path: str
    ping_path: str
    ping_response: str
    mount: str
    scoreboard: str
    bind: str | None
    pool_name: str
    threads: int


# (requests past --slow-request, the deferred-work counters summed over the stats hooks)
Counters = Callable[[], tuple[int, dict[str, Any]]]


class Answers:
    """The worker's own pages, found by path; owns the scoreboard when status is on."""

    def __init__(
        self, options: PageOptions, counters: Counters, sock: Any, reloaded: str | None = None
    ) -> None:
        """``reloaded``: this process reloaded in place, and this is the private status
        folder its previous interpreter kept ("" if none): the pool's figures go on."""
        self.options = options
        self.counters = counters
        self._stop = threading.Event()
        self.scoreboard: Scoreboard | None = None
        self._refresher: threading.Thread | None = None
        self.by_path: dict[str, Answer] = {}
        if options.status_path:
            self.scoreboard = Scoreboard.for_socket(
                options.scoreboard, sock, options.bind is None, options.threads, reloaded
            )
            self.by_path[options.status_path] = self.status
        if options.ping_path:
            self.by_path[options.ping_path] = self.ping
        # whether any request may be the worker's to answer (else find() is skipped)
        self.active = bool(self.by_path or options.mount)

    def start(self) -> None:
        if self.scoreboard is not None:
            self._refresher = threading.Thread(target=self._refresh, name="scoreboard", daemon=True)
            self._refresher.start()

    @property
    def kept_folder(self) -> str:
        """The private status folder, which a reload keeps for the next interpreter."""
        board = self.scoreboard
        return str(board.dir) if board is not None and board.private else ""

    def close(self, reloading: bool = False) -> None:
        self._stop.set()
        if self._refresher is not None:  # it writes the slot: ended before the slot goes
            self._refresher.join(5.0)
        if self.scoreboard is not None:
            self.scoreboard.close(reloading)

    def find(self, request: Request) -> Answer | None:
        """The answer for this request, if the worker gives it rather than the app."""
        env = request.environ
        if self.by_path:
            answer = self.by_path.get(env["SCRIPT_NAME"] + env["PATH_INFO"])
            if answer is not None:
                return answer
        return self.outside_mount if request.outside_mount else None

    def _refresh(self) -> None:
        """Copy the counters that change off the request path into our slot, twice a
        second, and sample the pool for its high-water marks."""
        board = self.scoreboard
        assert board is not None
        while True:
            board.set_counters(*self.counters())
            board.read_all()
            if self._stop.wait(0.5):
                return

    def status(self, request: Request) -> None:
        assert self.scoreboard is not None
        query = request.environ.get("QUERY_STRING", "")
        full = "full" in query.split("&")
        data = status.pool_status(self.scoreboard, self.options.pool_name, full)
        _respond(request, "200 OK", *status.render(data, query))

    def ping(self, request: Request) -> None:
        body = self.options.ping_response.encode() + b"\n"
        _respond(request, "200 OK", "text/plain", body)

    def outside_mount(self, request: Request) -> None:
        body = f"Not Found: outside {self.options.mount}\n".encode()
        _respond(request, "404 Not Found", "text/plain", body)


def _respond(request: Request, status_line: str, ctype: str, body: bytes) -> None:
    request.start_response(
        status_line,
        [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    request.buffer(body)
