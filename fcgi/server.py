"""The worker process: an epoll I/O loop in front of a request runner.

Why not flup's model: flup gives each connection a blocking thread that
``select``s before every record and sends END_REQUEST only after the app's
``close()``. nginx keeps many idle upstream connections open, each of which
would hold a thread, and the connection could not be reused until all the
post-response work was over (php-src issue 10335 in another guise). Here one
thread watches every socket with epoll, reads and parses whatever arrived,
and hands only complete requests to the runner; ``finish_request`` gives the
connection straight back to the loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .accesslog import AccessLog
from .answers import Answers
from .connection import Connection
from .listener import Listener
from .options import Options
from .request import Request
from .runner import InlineRunner, ThreadRunner
from .streams import ErrorStream
from .watchdog import Watchdog

log = logging.getLogger("fcgi")

# Exit codes: graceful stop with everything done, and with work left unrun.
EXIT_OK = 0
EXIT_ABANDONED = 3

SWEEP_INTERVAL = 1.0  # seconds between checks for stalled connections
FIRST_REQUEST_GRACE = 2.0  # seconds, when stopping: a new connection's wait for its request

DrainHook = Callable[[float], int]


class Server:
    """Accepts web server connections, parses requests, and runs them through the app."""

    def __init__(self, app: Callable[..., Any], options: Options, listener: Listener) -> None:
        self.app = app
        self.options = options
        self.listener = listener
        self.error_stream = ErrorStream()
        self.conns: dict[int, Connection] = {}
        self.epoll = select.epoll()
        runner_class = InlineRunner if options.threads == 1 else ThreadRunner
        self.runner = runner_class(self)
        self.drain_hooks: list[DrainHook] = []
        self.stats_hooks: list[Callable[[], dict[str, Any]]] = []
        self.pid = os.getpid()
        self.access_log = (
            AccessLog(options.access_log, options.access_log_format, self.pid)
            if options.access_log
            else None
        )
        self.answers = Answers(self)  # status page, ping, 404 outside --mount
        self.scoreboard = self.answers.scoreboard
        self.stopping = False
        self.requests = 0
        self.recycle_after = options.max_requests and options.max_requests + random.randint(
            0, options.max_requests_jitter
        )
        # Recycling an inherited socket restarts in place (cli.main exec()s): supervisord
        # closes a pool's socket whenever none of its processes is alive.
        self.recycling = False
        self.running: dict[Request, int] = {}  # request: the id of the thread running it
        self.deferred_limits = {
            "slow": options.slow_deferred or None,
            "timeout": options.deferred_timeout or None,
        }
        self.watchdog = Watchdog(self, options.slow_request) if options.slow_request else None
        self._accepting = True
        self._next_sweep = 0.0
        self.exit_code = EXIT_OK
        self._owner: object = None  # the token of the thread running the loop
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        max_conns = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fcgi_values = {
            "FCGI_MAX_CONNS": str(max_conns),
            "FCGI_MAX_REQS": str(options.threads),
            "FCGI_MPXS_CONNS": "0",
        }

    # -- lifecycle ---------------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.handle_term)
        signal.signal(signal.SIGINT, self.handle_term)
        signal.signal(signal.SIGQUIT, self.handle_quit)
        signal.signal(signal.SIGUSR1, self.handle_usr1)

    def handle_usr1(self, signum: int, frame: Any) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def serve(self) -> int:
        """Serve until ``stop()``, then stop gracefully; returns the exit code."""
        self.runner.start()
        if self.watchdog is not None:
            self.watchdog.start()
        self.answers.start()
        if self.listener.sock.family != socket.AF_UNIX and not self.options.allow:
            host = self.listener.sock.getsockname()[0]
            if not ipaddress.ip_address(host).is_loopback:
                log.warning(
                    "listening on %s with no allow-list: anyone who can reach it can "
                    "send requests; set --allow or FCGI_WEB_SERVER_ADDRS",
                    host,
                )
        self.epoll.register(self.listener.sock.fileno(), select.EPOLLIN)
        self.epoll.register(self._wake_r, select.EPOLLIN)
        log.info(
            "serving on %s with %d thread(s), pid %d",
            self.listener.describe(),
            self.options.threads,
            os.getpid(),
        )
        self._owner = token = object()
        self._run_loop(token)
        self._stopped.wait()  # the loop may have moved to another thread meanwhile
        return self.exit_code

    def hand_over_loop(self) -> bool:
        """Move the I/O loop to a new thread, so this one can go on with a detached request.

        The old owner leaves the rest of its event batch: epoll is level-triggered,
        so whatever it did not read is reported again to the new owner.
        """
        if self.stopping:
            return False
        self._owner = token = object()
        threading.Thread(
            target=self._run_loop, args=(token,), name="fcgi-loop", daemon=True
        ).start()
        return True

    def _run_loop(self, token: object) -> None:
        try:
            while not self.stopping:
                if not self._poll(-1, token):
                    return  # another thread owns the loop now
            self.exit_code = self._graceful_stop(token)
        except BaseException:
            log.exception("the I/O loop failed; stopping")
            self.exit_code = 1
        finally:
            if self._owner is token:
                if not self.recycling:
                    self.listener.close()
                self.answers.close()
                if self.access_log is not None:
                    self.access_log.close()
                for conn in list(self.conns.values()):
                    conn.close()
                self.epoll.close()
                self._stopped.set()

    def stop(self) -> None:
        """Begin a graceful stop; safe from a signal handler or another thread."""
        self.stopping = True
        os.write(self._wake_w, b"x")

    def handle_term(self, signum: int, frame: Any) -> None:
        self.stop()

    def handle_quit(self, signum: int, frame: Any) -> None:
        log.warning("SIGQUIT: stopping at once, dropping running requests and deferred work")
        self.listener.close()
        os._exit(1)

    def _graceful_stop(self, token: object) -> int:
        deadline = time.monotonic() + self.options.graceful_timeout
        log.info(
            "stopping: finishing running requests and deferred work (up to %.0f s)",
            self.options.graceful_timeout,
        )
        self._pause_accepting(True)
        if not self.recycling:  # a recycled worker keeps its socket for its next life
            self.listener.close()
        # Requests still arriving on open connections are read to the end and run.
        self._poll(0, token)
        while time.monotonic() < deadline and self._close_idle():
            self._poll(0.05, token)
        if not self.runner.stop(deadline):
            log.warning("requests still running at the graceful deadline")
        abandoned = 0
        for hook in self.drain_hooks:
            try:
                abandoned += hook(max(0.0, deadline - time.monotonic()))
            except Exception:
                log.exception("drain hook %r failed", hook)
        log.info("stopped after %d request(s)", self.requests)
        return EXIT_ABANDONED if abandoned else EXIT_OK

    def _close_idle(self) -> bool:
        """Close connections with no request; True while some request is still arriving.

        A connection that has carried no request yet gets FIRST_REQUEST_GRACE for its
        first one: web servers connect only to send a request, and nginx retries a
        request whose connection was closed under it only if that connection was reused.
        """
        arriving = False
        now = time.monotonic()
        for conn in list(self.conns.values()):
            request = conn.request
            if request is None:
                if conn.fresh and now - conn.opened < FIRST_REQUEST_GRACE:
                    arriving = True
                else:
                    conn.close()
            elif not request.running:
                arriving = True
        return arriving

    # -- the I/O loop --------------------------------------------------------------

    def _poll(self, timeout: float, token: object) -> bool:
        """Handle one batch of events; False if the loop was handed over meanwhile."""
        listen_fd = self.listener.sock.fileno()
        conns = self.conns
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._close_stalled(now)
        if timeout < 0 or timeout > SWEEP_INTERVAL:
            timeout = SWEEP_INTERVAL
        for fd, _events in self.epoll.poll(timeout):
            if fd == listen_fd:
                self._accept()
            elif fd == self._wake_r:
                os.read(self._wake_r, 4096)
            else:
                conn = conns.get(fd)
                if conn is not None:
                    ready = conn.on_readable()
                    if ready is not None:
                        self.requests += 1
                        ready.seq = self.requests
                        if self.requests == self.recycle_after:
                            log.info("recycling after %d requests", self.requests)
                            self.recycling = self.listener.path is None
                            self.stop()
                        self.runner.submit(ready)
                        if self._owner is not token:
                            return False
        return True

    def _close_stalled(self, now: float) -> None:
        """Close connections whose half-sent record or request is older than --read-timeout."""
        limit = now - self.options.read_timeout
        for conn in list(self.conns.values()):
            if conn.pending_since is not None and conn.pending_since < limit:
                log.warning(
                    "connection %d: half-sent for over %.0f s; closing it",
                    conn.fd,
                    self.options.read_timeout,
                )
                conn.close_when_idle()

    def _accept(self) -> None:
        sock = self.listener.sock
        while True:
            try:
                client, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if client.family != socket.AF_UNIX:
                allow = self.options.allow
                if allow and _addr[0] not in allow:
                    log.warning(
                        "connection from %s refused: not in the allow-list "
                        "(--allow / FCGI_WEB_SERVER_ADDRS)",
                        _addr[0],
                    )
                    client.close()
                    continue
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            if self.scoreboard is not None:
                self.scoreboard.accepted()
            conn = Connection(client, self)
            log.debug("connection %d: opened", conn.fd)
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLIN)
            if len(self.conns) >= self.options.max_connections:
                log.warning(
                    "%d connections open (--max-connections); new ones wait in the listen backlog",
                    len(self.conns),
                )
                self._pause_accepting(True)
                return

    def _pause_accepting(self, pause: bool) -> None:
        if pause == (not self._accepting) or (self.stopping and not pause):
            return
        self._accepting = not pause
        fd = self.listener.sock.fileno()
        with contextlib.suppress(OSError, ValueError):
            if pause:
                self.epoll.unregister(fd)
            else:
                self.epoll.register(fd, select.EPOLLIN)

    def forget(self, conn: Connection) -> None:
        """Stop watching ``conn``; safe from any thread, and more than once."""
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(conn.fd)
            if not self._accepting and len(self.conns) < self.options.max_connections:
                self._pause_accepting(False)

    def add_stats_hook(self, hook: Callable[[], dict[str, Any]]) -> None:
        """Offered as ``environ["fcgi.add_stats_hook"]``: ``hook()`` returns deferred-work
        counters (queued, running, done, failed, abandoned) for the status page."""
        if hook not in self.stats_hooks:
            self.stats_hooks.append(hook)

    def add_drain_hook(self, hook: DrainHook) -> None:
        """Offered to apps as ``environ["fcgi.add_drain_hook"]``: ``hook(seconds_left)`` runs
        at graceful stop and returns how many pieces of work it had to abandon."""
        if hook not in self.drain_hooks:
            self.drain_hooks.append(hook)

    # -- running a request, on a runner thread ------------------------------------

    def handle(self, request: Request) -> None:
        environ = request.build_environ(self)
        request.started = time.monotonic()
        self.running[request] = threading.get_ident()
        board = self.scoreboard
        if board is not None:
            board.request_started(
                environ["REQUEST_METHOD"],
                environ.get("REQUEST_URI", ""),
                environ.get("CONTENT_LENGTH", ""),
            )
        answer = self.answers.find(request)
        result = None
        try:
            request.app_phase = True
            if answer is not None:
                answer(request)
            else:
                result = self.app(environ, request.start_response)
            if isinstance(result, (list, tuple)):
                for chunk in result:
                    request.buffer(chunk)
            elif result is not None:
                for chunk in result:
                    request.write(chunk)
        except Exception:
            request.fail(sys.exc_info())
        finally:
            request.app_phase = False
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    request.fail(sys.exc_info())
            request.finish()
            request.close_body()
            del self.running[request]
            if board is not None:
                board.request_ended()
            if request.dropped:
                log.debug(
                    "%s: %d byte(s) written after finish_request dropped", request, request.dropped
                )
