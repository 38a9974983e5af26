"""One socket from the web server: records in, responses out, one request at a time.

Reading happens only on the I/O loop thread, when epoll says the socket is
readable, so a slow or silent peer never holds a thread. Writing happens on
whichever thread runs the request, under ``lock``; the socket stays
non-blocking and a full send buffer is waited out with ``poll``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import TYPE_CHECKING

from . import protocol
from .request import Request

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("fcgi")

_JOIN_LIMIT = 64 * 1024  # below this, one copy costs less than scatter-gather
_IOV_MAX = 1024  # buffers one sendmsg() may take on Linux

_ACCEPTED_TYPES = frozenset(
    (
        protocol.BEGIN_REQUEST,
        protocol.ABORT_REQUEST,
        protocol.PARAMS,
        protocol.STDIN,
        protocol.DATA,
    )
)


class Connection:
    """A web server connection and the request it is carrying, if any."""

    def __init__(self, sock: socket.socket, server: Server) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.server = server
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.request: Request | None = None
        self.closed = False
        self.peer_gone = False
        self.ignored: set[int] = set()  # ids whose late records we drop: ended or refused
        self.pending_since: float | None = None  # when a half-sent record or request began
        self.opened = time.monotonic()
        self.fresh = True  # no request begun on it yet

    # -- reading, on the I/O loop thread ----------------------------------------

    def on_readable(self) -> Request | None:
        """Read what has arrived; return a request that is now complete and ready to run."""
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return None
        except OSError as exc:
            log.debug("connection %d: recv failed: %s", self.fd, exc)
            data = b""
        if not data:
            self.close_when_idle()  # the web server closed its side
            return None
        buf = self.buf
        buf += data
        ready = None
        try:
            records, used = protocol.parse_records(buf)
            with self.lock:
                for rtype, rid, content in records:
                    if self._on_record(rtype, rid, content):
                        ready = self.request
        except protocol.ProtocolError as exc:
            log.warning("connection %d: %s; closing it", self.fd, exc)
            self.close_when_idle()
            return None
        del buf[:used]
        request = self.request
        if buf or (request is not None and not request.running):
            if self.pending_since is None:
                self.pending_since = time.monotonic()
        else:
            self.pending_since = None
        return ready

    def _on_record(self, rtype: int, rid: int, content: bytes) -> bool:
        """Handle one record; True when it completed the current request."""
        request = self.request
        if rid == protocol.NULL_REQUEST_ID:
            if rtype == protocol.GET_VALUES:
                names = protocol.decode_pairs(content)
                self.send([protocol.get_values_result(names, self.server.fcgi_values)])
            else:
                log.warning(
                    "connection %d: record type %d with request id 0; answered UNKNOWN_TYPE",
                    self.fd,
                    rtype,
                )
                self.send([protocol.unknown_type(rtype)])
            return False
        if rtype not in _ACCEPTED_TYPES:
            self.send([protocol.unknown_type(rtype)])
            return False
        if rtype == protocol.BEGIN_REQUEST:
            if len(content) < protocol.BEGIN_BODY.size:
                raise protocol.ProtocolError("short BEGIN_REQUEST body")
            role, flags = protocol.BEGIN_BODY.unpack_from(content)
            if request is not None:
                self._ignore(rid)
                self.send([protocol.reject(rid, protocol.CANT_MPX_CONN)])
            elif role != protocol.RESPONDER:
                self._ignore(rid)
                self.send([protocol.reject(rid, protocol.UNKNOWN_ROLE)])
            else:
                self.request = Request(self, rid, bool(flags & protocol.KEEP_CONN))
                self.fresh = False
            return False
        if request is None or request.id != rid:
            if rid in self.ignored:
                return False  # late records of a request that ended: ignore, as the spec says
            raise protocol.ProtocolError(
                f"record type {rtype} for request {rid}, which was never begun"
            )
        if rtype == protocol.ABORT_REQUEST:
            if request.running:
                request.abort()
            else:
                self.request = None
                self._ignore(rid)
                self.send([protocol.end_request(rid, 1)])
            return False
        if request.running:
            return False
        opts = self.server.options
        if rtype == protocol.PARAMS:
            request.add_params(content, opts.max_params)
        elif rtype == protocol.STDIN and request.add_stdin(content, opts.spool_threshold):
            request.running = True
            return True
        return False

    def _ignore(self, rid: int) -> None:
        if len(self.ignored) >= 64:  # a peer cycling through ids gets no unbounded memory
            self.ignored.clear()
        self.ignored.add(rid)

    def close_when_idle(self) -> None:
        """Close now, or, while a request runs, stop watching and let it close the socket
        when it ends (its output is dropped: the peer is gone or has broken the protocol)."""
        with self.lock:
            request = self.request
            if request is not None and request.running and not request.finished:
                self.peer_gone = True
                request.aborted = True
                self.server.forget(self)
                return
        self.close()

    # -- writing, on any thread, under self.lock ------------------------------

    def send(self, parts: list[bytes]) -> int:
        """Send all of ``parts``; on a dead peer mark the request aborted and return 0.

        Small responses go out joined in one ``send``; large ones with ``sendmsg``,
        which gathers the slices without copying them.
        """
        if self.peer_gone or self.closed:
            return 0
        total = sum(map(len, parts))
        try:
            if total <= _JOIN_LIMIT:
                self._send_all(memoryview(b"".join(parts)))
            else:
                self._send_parts(parts)
        except OSError as exc:
            log.debug("connection %d: send failed: %s", self.fd, exc)
            self.peer_gone = True
            if self.request is not None:
                self.request.aborted = True
            return 0
        return total

    def _send_all(self, view: memoryview) -> None:
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                self._wait_writable()

    def _send_parts(self, parts: list[bytes]) -> None:
        index = 0
        while index < len(parts):
            try:
                sent = self.sock.sendmsg(parts[index : index + _IOV_MAX])
            except BlockingIOError:
                self._wait_writable()
                continue
            while sent:
                size = len(parts[index])
                if sent >= size:
                    sent -= size
                    index += 1
                else:
                    parts[index] = memoryview(parts[index])[sent:]
                    sent = 0

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        if not poller.poll(self.server.options.write_timeout * 1000):
            raise TimeoutError(f"peer read nothing for {self.server.options.write_timeout} s")

    def request_finished(self, request: Request) -> None:
        """Called under ``lock`` once END_REQUEST went out (or could not)."""
        if self.request is request:
            self.request = None
        self._ignore(request.id)
        if self.peer_gone or not request.keep_conn:
            self.server.forget(self)
            self.closed = True
            self.sock.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.server.forget(self)
            self.sock.close()
