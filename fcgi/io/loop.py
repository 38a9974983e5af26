"""The I/O loop: the one owner of epoll, the listener and every connection's reading.

It accepts (and closes the least recently used idle connection at
``--max-connections``), reads and parses what arrives, hands body bytes to
``on_body`` and complete requests to ``on_request``, flushes the output request
threads queued (a request thread sends what the socket takes at once itself, see
``channel``), and closes connections that stall past ``--read-timeout`` or
``--write-timeout``. Other
threads never touch epoll: they ask with ``call_soon`` (a queue and a wake
pipe, as gunicorn's gthread worker does) or ``attend(conn)``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..wire.connection import (
    BodyReceived,
    Connection,
    ConnState,
    Event,
    IncomingRequest,
    RequestReady,
)
from .channel import HIGH_WATER, LOW_WATER, Channel
from .listener import Listener

log = logging.getLogger("fcgi")

SWEEP_INTERVAL = 1.0  # seconds between checks for stalled connections
# Seconds a new connection is safe from eviction, for its first request (nginx sends
# it at once); after that it is evicted as an idle one is, least recently used first.
FIRST_REQUEST_GRACE = 0.5

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_IN_OUT = select.EPOLLIN | select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR

OnRequest = Callable[[Channel, IncomingRequest], None]
OnBody = Callable[[IncomingRequest, bytes], None]


class Limits(Protocol):
    """What the loop needs of the worker's options."""

    max_connections: int
    max_params: int
    read_timeout: float
    write_timeout: float
    allow: frozenset[str]


@dataclass
class KeptConnection:
    """A web server connection with no request on it, kept open across exec."""

    fd: int
    buffered: bytes = b""  # a record half-read before the exec, parsed first after it
    fresh: bool = False  # no request was ever begun on it
    ended: list[int] = field(default_factory=list)  # ids whose late records are dropped


class IOLoop:
    """epoll over the listener, the wake pipe and every connection."""

    def __init__(
        self,
        listener: Listener,
        options: Limits,
        on_request: OnRequest,
        on_body: OnBody,
        fcgi_values: dict[str, str],
    ) -> None:
        self.listener = listener
        self.options = options
        self.on_request = on_request
        self.on_body = on_body
        self.fcgi_values = fcgi_values
        # what FCGI_GET_VALUES answers is also the most requests a connection may have
        self.max_requests = int(fcgi_values.get("FCGI_MAX_REQS") or 0)
        self.epoll = select.epoll()
        self.conns: collections.OrderedDict[int, Channel] = collections.OrderedDict()
        self.accepting = False  # the listener is registered
        self._want_accepting = False  # the server wants connections (not stopping)
        self.owner: int | None = None  # the thread running the loop now
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        self._next_sweep = 0.0
        self.batch = 0  # counts the batches of events polled
        self.last_blocked = 0  # the last batch whose poll waited for its events
        self.count_waits = False  # keep last_blocked (the scoreboard's, with --threads 1)
        self._local = threading.local()  # still_owner of the thread polling, per thread
        self._listen_fd = listener.sock.fileno()
        self.epoll.register(self._wake_r, select.EPOLLIN)

    # -- from any thread --------------------------------------------------------------

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self.owner

    def call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the loop's thread, at its next turn."""
        self._calls.append((func, args))
        if not self._wake_pending and not self.in_loop_thread():
            self._wake_pending = True
            self.wake()

    def wake(self) -> None:
        fd = self._wake_w
        if fd >= 0:  # after shutdown the number may belong to another file by now
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(fd, b"x")

    def attend(self, conn: Channel) -> None:
        """Look at ``conn`` again: watch it for writability, or close it if it is done.

        Asked by request threads only, so always at the loop's next turn, even on the
        loop's own thread (a request on the inline runner): the loop may move to another
        thread while that request runs (``server.hand_over_loop``), and a request then
        never touches the loop's state midway through."""
        self.call_soon(self._attend, conn)

    # -- on the loop's thread -----------------------------------------------------------

    def start_accepting(self) -> None:
        self._set_accepting(True)

    def stop_accepting(self) -> None:
        self._set_accepting(False)

    def poll(self, timeout: float, still_owner: Callable[[], bool]) -> bool:
        """Handle one batch of events; False if the loop moved to another thread meanwhile
        (a request that finished early took this one)."""
        self.owner = threading.get_ident()
        self._local.still_owner = still_owner
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._sweep(now)
        if self._calls and not self._run_calls():
            return False
        until = self._next_sweep - now  # (sooner than a second when a grace ends)
        if timeout < 0 or timeout > until:
            timeout = until if until > 0.0 else 0.0
        conns = self.conns
        self.batch += 1
        if self.count_waits:
            # events already waiting, or wait for them (the second poll only when idle):
            # whether the loop waited tells if a request found it busy
            ready = self.epoll.poll(0)
            if not ready:
                self.last_blocked = self.batch
                if timeout:
                    ready = self.epoll.poll(timeout)
        else:
            ready = self.epoll.poll(timeout)
        for fd, mask in ready:
            conn = conns.get(fd)
            if conn is None:
                if fd == self._listen_fd:
                    self._accept()
                elif fd == self._wake_r:
                    self._wake_pending = False
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    if not self._run_calls():
                        return False
                continue
            if mask & _OUT:
                more = conn.on_writable()
                if conn.paused and conn.out_size <= LOW_WATER:
                    conn.paused = False  # it reads what we sent: take its records again
                    self._modify(conn, _IN_OUT if more else _IN)
                elif not more:
                    self._modify(conn, _IN)
                if conn.done:
                    self.close(conn)
                    continue
                if not mask & _READABLE:
                    continue
            if conn.parked:  # hung up or broken while a reload drains: the peer is gone
                self.close(conn)
                continue
            events = conn.on_readable()
            if events is None:
                self.close(conn)
                continue
            conns.move_to_end(fd)
            if events and not self._dispatch(conn, events, still_owner):
                return False
            if conn.out or conn.done:
                self._attend(conn)
                if conn.out_size > HIGH_WATER and not conn.paused and conns.get(fd) is conn:
                    # a peer that sends and never reads (a flood of records we answer)
                    # is not read until it takes its answers: memory stays bounded
                    conn.paused = True
                    self._modify(conn, _OUT)
        return True

    def _dispatch(
        self, conn: Channel, events: list[Event], still_owner: Callable[[], bool]
    ) -> bool:
        """Hand ``conn``'s events on; False if a request took the loop's thread with it,
        in which case the events after it (several requests multiplexed in one read) go to
        the new owner."""
        on_request = self.on_request
        for i, event in enumerate(events):
            kind = type(event)
            if kind is RequestReady:
                on_request(conn, event.request)  # type: ignore[union-attr]
                if not still_owner():
                    rest = events[i + 1 :]
                    self.call_soon(self._dispatch_rest, conn, rest)
                    return False
            elif kind is BodyReceived:
                # outside the channel's lock: a body spooled to a slow disk holds no writer
                self.on_body(event.request, event.data)  # type: ignore[union-attr]
            else:
                log.debug(
                    "connection %d: request %d aborted by the web server",
                    conn.fd,
                    event.request_id,  # type: ignore[union-attr]
                )
        return True

    def _dispatch_rest(self, conn: Channel, events: list[Event]) -> None:
        if self.conns.get(conn.fd) is not conn:
            return  # closed meanwhile: its requests have no one to answer
        if self._dispatch(conn, events, self._local.still_owner) and (conn.out or conn.done):
            self._attend(conn)

    def _run_calls(self) -> bool:
        """Run what other threads asked for; False if a call took the loop's thread."""
        calls = self._calls
        while calls:
            func, args = calls.popleft()
            func(*args)
            if not self._local.still_owner():
                if calls:
                    self.wake()
                return False
        return True

    def _attend(self, conn: Channel) -> None:
        if self.conns.get(conn.fd) is not conn:
            return
        if conn.done or conn.closed:
            self.close(conn)
        elif conn.watch_writes():
            self._modify(conn, _OUT if conn.paused else _IN_OUT)

    def _modify(self, conn: Channel, mask: int) -> None:
        if conn.parked:
            mask &= ~select.EPOLLIN  # a parked connection is written, never read
        with contextlib.suppress(OSError, ValueError):
            self.epoll.modify(conn.fd, mask)

    def close(self, conn: Channel) -> None:
        """Forget ``conn`` and close its socket; accepting resumes below the limit."""
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(conn.fd)
        conn.close()
        if not self.accepting and self._want_accepting:
            self._update_accepting()

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)

    def shutdown(self) -> None:
        self.close_all()
        self.epoll.close()
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        os.close(wake_r)
        os.close(wake_w)

    def _set_accepting(self, on: bool) -> None:
        self._want_accepting = on
        self._update_accepting()

    def _update_accepting(self) -> None:
        """Watch the listener while the server wants connections and one can be taken:
        below --max-connections, or with an idle connection to close for it."""
        on = self._want_accepting and (
            len(self.conns) < self.options.max_connections or self._evictable() is not None
        )
        if on == self.accepting:
            return
        self.accepting = on
        with contextlib.suppress(OSError, ValueError):
            if on:
                self.epoll.register(self._listen_fd, select.EPOLLIN)
            else:
                self.epoll.unregister(self._listen_fd)

    def _accept(self) -> None:
        sock = self.listener.sock
        limit = self.options.max_connections
        while True:
            if len(self.conns) >= limit and not self._evict_idle():
                log.warning(
                    "%d connections open (--max-connections), none idle; new ones wait in "
                    "the listen backlog",
                    len(self.conns),
                )
                self.accepting = False
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(self._listen_fd)
                # a connection never used becomes evictable when its grace ends: look then
                fresh = [c.opened for c in self.conns.values() if c.idle and c.proto.fresh]
                if fresh:
                    self._next_sweep = min(self._next_sweep, min(fresh) + FIRST_REQUEST_GRACE)
                return
            try:
                client, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if client.family != socket.AF_UNIX:
                allow = self.options.allow
                if allow and addr[0] not in allow:
                    log.warning(
                        "connection from %s refused: not in the allow-list "
                        "(--allow / FCGI_WEB_SERVER_ADDRS)",
                        addr[0],
                    )
                    client.close()
                    continue
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            opts = self.options
            proto = Connection(
                self.fcgi_values, opts.max_params, multiplex=True, max_requests=self.max_requests
            )
            conn = Channel(client, proto, self, opts.write_timeout)
            log.debug("connection %d: opened", conn.fd)
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, _IN)

    def _evictable(self) -> Channel | None:
        """The least recently used idle connection, if any; one that has not sent its first
        request yet only after FIRST_REQUEST_GRACE (nginx retries a request only when a
        reused connection closes under it, never a new one)."""
        since = time.monotonic() - FIRST_REQUEST_GRACE
        for conn in self.conns.values():
            if conn.idle and (not conn.proto.fresh or conn.opened <= since):
                return conn
        return None

    def _evict_idle(self) -> bool:
        conn = self._evictable()
        if conn is None:
            return False
        log.debug("connection %d: closed, idle, to admit a new one (--max-connections)", conn.fd)
        self.close(conn)
        return True

    def _sweep(self, now: float) -> None:
        """Close connections half-sent past --read-timeout, or not reading past
        --write-timeout (a limit per stall: each time the peer reads, it starts again)."""
        read_limit = now - self.options.read_timeout
        write_limit = now - self.options.write_timeout
        for conn in list(self.conns.values()):
            since = conn.receiving_since
            if since is not None and since < read_limit:
                log.warning(
                    "connection %d: half-sent for over %.0f s; closing it",
                    conn.fd,
                    self.options.read_timeout,
                )
                self.close(conn)
                continue
            stalled = conn.stalled_since
            if stalled is not None and stalled < write_limit and conn.out:
                log.warning(
                    "connection %d: the peer read nothing for %.0f s (--write-timeout); closing it",
                    conn.fd,
                    self.options.write_timeout,
                )
                self.close(conn)
        if not self.accepting and self._want_accepting:
            self._update_accepting()

    def close_idle(self, now: float) -> bool:
        """While stopping: close connections with no request; True while some request is
        still arriving (or a new connection's first one may still come)."""
        arriving = False
        for conn in list(self.conns.values()):
            state = conn.proto.state
            if state is ConnState.IDLE and conn.receiving_since is None:
                if conn.proto.fresh and now - conn.opened < FIRST_REQUEST_GRACE:
                    arriving = True
                elif not conn.out:
                    self.close(conn)
            elif conn.proto.receiving:
                arriving = True
        return arriving

    def close_after_responses(self) -> None:
        """While stopping: each connection closes right after its last response (after
        END_REQUEST, never in the middle of the web server's next request)."""
        for conn in self.conns.values():
            if not conn.proto.close_when_done:
                with conn.lock:
                    conn.proto.close_when_done = True

    def park_idle(self) -> bool:
        """While draining for a reload: stop reading each connection on which no request
        is arriving (what the web server sends next waits in the kernel for the next
        interpreter; requests running on it still send their output); True while some
        request is still arriving on another. On a multiplexed connection this keeps
        new requests from holding the reload up."""
        arriving = False
        for conn in self.conns.values():
            if conn.parked:
                continue
            if conn.proto.arriving:
                arriving = True
            else:
                conn.parked = True
                self._modify(conn, _IN_OUT if conn.watching_writes else _IN)
        return arriving

    def keep_idle(self) -> list[KeptConnection]:
        """At the end of a reload's drain: every connection with no request on it,
        detached from its socket object so it stays open for the next interpreter
        (the lifecycle hands them on, ``reload.exec_in_place``); the loop's shutdown
        closes the others."""
        kept = []
        for conn in list(self.conns.values()):
            if conn.proto.state is ConnState.IDLE and not conn.out and not conn.closed:
                del self.conns[conn.fd]
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(conn.fd)
                proto = conn.proto
                kept.append(
                    KeptConnection(
                        conn.sock.detach(), proto.pending_bytes(), proto.fresh, proto.ended_ids()
                    )
                )
        return kept

    def adopt(self, kept: KeptConnection) -> None:
        """Take a connection the previous interpreter of this process kept open."""
        sock = socket.socket(fileno=kept.fd)
        sock.setblocking(False)
        opts = self.options
        proto = Connection(
            self.fcgi_values, opts.max_params, multiplex=True, max_requests=self.max_requests
        )
        proto.fresh = kept.fresh
        proto.ignore_ids(kept.ended)
        conn = Channel(sock, proto, self, opts.write_timeout)
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, _IN)
        if kept.buffered:  # part of a record: the rest is in the kernel's buffer
            proto.receive_data(kept.buffered)
            conn.receiving_since = time.monotonic()

    def has_output(self) -> bool:
        return any(conn.out for conn in self.conns.values())
