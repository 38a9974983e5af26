"""One socket from the web server: the I/O half of a FastCGI connection.

The protocol lives in ``wire.connection.Connection`` (no I/O); this class owns
the socket and its output buffer. Only the I/O loop reads, registers with
epoll and closes. A request thread hands its output over with
``send_stdout``/``end_request``: when nothing is queued it tries one
non-blocking send itself (most responses leave that way, with no hand-off),
queues the rest for the loop to flush when the socket is writable, and waits
on a condition only while its own connection holds more than ``HIGH_WATER``
bytes. ``lock`` guards the protocol state and the buffer; it is never held
across a call that can block.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Protocol

from ..wire.connection import Connection, ConnState, Event, IncomingRequest
from ..wire.records import Chunk, ProtocolError

log = logging.getLogger("fcgi")

HIGH_WATER = 1 << 20  # bytes queued on one connection before its writer waits
LOW_WATER = 1 << 18  # and when it may go on
_JOIN_LIMIT = 64 * 1024  # below this, one copy costs less than scatter-gather
_IOV_MAX = 1024  # buffers one sendmsg() may take on Linux
# Not more: a larger bytes object would be mmap()ed and unmapped by glibc at each recv()
_RECV_SIZE = 65536


class LoopHandle(Protocol):
    """What a connection needs of the I/O loop: to be looked at again, from any thread."""

    def attend(self, conn: Channel) -> None: ...

    def in_loop_thread(self) -> bool: ...


class Channel:
    """A web server connection: socket, protocol state, output buffer."""

    def __init__(
        self, sock: socket.socket, proto: Connection, loop: LoopHandle, write_timeout: float
    ) -> None:
        self.sock = sock
        self.write_timeout = write_timeout
        self.fd = sock.fileno()
        self.proto = proto
        self.loop = loop
        self.lock = threading.Lock()
        self._drained = threading.Condition(self.lock)
        self._waiting = 0  # writers waiting on _drained (notify only when there are some)
        self.out: list[bytes | memoryview] = []
        self.out_size = 0
        self.queued = 0  # bytes ever handed to the socket or the buffer
        self.written = 0  # bytes the socket ever took
        self.lost = False  # output was dropped unsent: the peer broke or the socket closed
        self.closed = False
        self.watching_writes = False  # EPOLLOUT is registered (changed on the loop only)
        self.paused = False  # not read while over HIGH_WATER (changed on the loop only)
        self.stalled_since: float | None = None  # output waiting since (per stall)
        self.receiving_since: float | None = None  # a record or request half-sent since
        self.opened = time.monotonic()
        self.parked = False  # no longer read: kept for the next interpreter (a reload)

    # -- on the I/O loop ----------------------------------------------------------

    def on_readable(self) -> list[Event] | None:
        """Read what has arrived; the events it completed, or None once the connection
        must close (the peer left or broke the protocol)."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            log.debug("connection %d: recv failed: %s", self.fd, exc)
            data = b""
        if not data:
            log.debug("connection %d: closed by the peer", self.fd)
            return None
        proto = self.proto
        with self.lock:
            try:
                events = proto.receive_data(data)
            except ProtocolError as exc:  # the peer's fault: one line is enough
                log.warning("connection %d: %s; closing it", self.fd, exc)
                return None
            except Exception:  # ours: the traceback, then the connection closes
                log.exception(
                    "connection %d: the protocol failed on what it read; closing it", self.fd
                )
                return None
            if proto.has_answers:
                self._push(proto.data_to_send())
        if proto.receiving:
            if self.receiving_since is None:
                self.receiving_since = time.monotonic()
        else:
            self.receiving_since = None
        return events

    def on_writable(self) -> bool:
        """Flush what the socket takes now; True while there is more to send (keep
        watching for writability). Decided under ``lock``, so a writer that queues
        after this sees ``watching_writes`` off and asks the loop to watch again."""
        with self.lock:
            self._flush(once=False)
            self.watching_writes = bool(self.out)
            return self.watching_writes

    def watch_writes(self) -> bool:
        """Whether the loop should watch for writability now (and note that it does)."""
        with self.lock:
            self.watching_writes = bool(self.out) and not self.closed
            return self.watching_writes

    @property
    def done(self) -> bool:
        """True when the connection must close now: broken or cut (what is still queued
        is dropped: the response is not complete anyway), or ending with nothing left
        to send."""
        state = self.proto.state
        return state is ConnState.CLOSED or (state is ConnState.CLOSING and not self.out)

    @property
    def idle(self) -> bool:
        """No request on it, nothing half-sent, nothing to send: it may be closed."""
        return self.proto.state is ConnState.IDLE and not self.out and self.receiving_since is None

    def close(self) -> None:
        """Close the socket (after the loop has unregistered it); wakes waiting writers."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.proto.close()
            self.lost = self.lost or bool(self.out)
            self.out.clear()
            self.out_size = 0
            self.sock.close()
            self._drained.notify_all()

    # -- from any thread ------------------------------------------------------------

    def send_stdout(
        self, rid: int, chunks: list[bytes], incoming: IncomingRequest | None = None
    ) -> bool:
        """Queue STDOUT for request ``rid``; False if it has ended (the output is dropped).
        ``incoming``: the request itself, so an aborted one cannot write to its id's successor."""
        with self.lock:
            parts = self.proto.stdout(rid, chunks, incoming)
            if parts is None:
                return False
            attend = self._push(parts)
        self._after_push(attend)
        return True

    def send_framed(self, rid: int, data: memoryview, incoming: IncomingRequest) -> bool:
        """Queue STDOUT records the caller framed for request ``rid`` (a file read straight
        into records); False if the request has ended (the output is dropped)."""
        with self.lock:
            if not self.proto.framed(rid, incoming):
                return False
            attend = self._push([data])  # type: ignore[list-item]
        self._after_push(attend)
        return True

    def end_request(
        self, rid: int, chunks: list[bytes] | None = None, incoming: IncomingRequest | None = None
    ) -> int | None:
        """Queue the last output and END_REQUEST; None if the request had already ended,
        else where its output ends in the connection's stream (for ``unsent``)."""
        with self.lock:
            parts = self.proto.end_request(rid, chunks, incoming=incoming)
            if parts is None:
                return None
            attend = self._push(parts)
            end = self.queued
        if attend or self.out_size > HIGH_WATER:
            self._after_push(attend)
        return end

    def unsent(self, end: int) -> int:
        """How many of the bytes queued before ``end`` will never go out: those still
        unsent when the connection dropped its output (the peer broke off), else 0."""
        if not self.lost:  # the common case, read without the lock: it only turns True
            return 0
        with self.lock:
            return max(0, end - self.written)

    def cut(self, rid: int, incoming: IncomingRequest | None = None) -> None:
        """End request ``rid`` without END_REQUEST: the connection closes, so the web
        server sees the response break off."""
        with self.lock:
            self.proto.cut(rid, incoming)
        self.loop.attend(self)

    def expire(self, rid: int, answer: list[bytes], incoming: IncomingRequest) -> bool | None:
        """End request ``rid``, which the worker gave up on, from any thread: ``answer``
        and END_REQUEST if none of its response went out (True), else a cut (False: the
        connection closes); None if it had ended. Decided and sent under one lock, so a
        write of the app's thread comes wholly before or is dropped."""
        with self.lock:
            parts = self.proto.expire(rid, answer, incoming)
            if parts is None:
                return None
            attend = self._push(parts) if parts else True
        if attend:
            self.loop.attend(self)
        return bool(parts)

    def _push(self, parts: list[Chunk]) -> bool:
        """Under ``lock``: queue ``parts``, trying one non-blocking send first if nothing
        was queued; True when the loop must look at the connection (watch or close)."""
        if self.closed:
            return False
        out = self.out
        size = sum(map(len, parts))
        self.queued += size
        if not out and size <= _JOIN_LIMIT:
            # The common case, a small response on a free connection: one send, no queue.
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.debug("connection %d: send failed: %s", self.fd, exc)
                self.proto.close()  # the peer is gone: the loop closes the socket
                self.lost = True
                return True
            self.written += sent
            if sent < size:
                out.append(memoryview(data)[sent:] if sent else data)
                self.out_size = size - sent
                self.stalled_since = time.monotonic()
        else:
            was_empty = not out
            out += parts
            self.out_size += size
            if was_empty:
                self.stalled_since = time.monotonic()
                self._flush(once=True)
        if out and not self.watching_writes:
            return True
        state = self.proto.state
        return state is ConnState.CLOSING or state is ConnState.CLOSED

    def _after_push(self, attend: bool) -> None:
        if attend:
            self.loop.attend(self)
        if self.out_size > HIGH_WATER:
            self._wait_drained()

    def _wait_drained(self) -> None:
        """Over the high-water mark: the loop's thread flushes itself (nobody else
        would); any other thread waits until the loop has drained the buffer."""
        if self.loop.in_loop_thread():
            self._flush_blocking()
            return
        with self.lock:
            self._waiting += 1
            try:
                while self.out_size > LOW_WATER and not self.closed:
                    self._drained.wait()
            finally:
                self._waiting -= 1

    def _flush_blocking(self) -> None:
        """On the loop's own thread (the inline runner): wait for the socket with
        ``poll``; the loop's write timeout is enforced here as the same per-stall limit."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while True:
            with self.lock:
                if self.closed or self.out_size <= LOW_WATER:
                    return
                self._flush(once=False)
                stalled = self.stalled_since
            limit = self.write_timeout
            left = (stalled or time.monotonic()) + limit - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                log.warning(
                    "connection %d: the peer read nothing for %.0f s (--write-timeout); closing it",
                    self.fd,
                    limit,
                )
                with self.lock:
                    self.proto.close()
                self.loop.attend(self)
                return

    def _flush(self, once: bool) -> None:
        """Under ``lock``: send from the buffer without blocking; ``once``: one call."""
        out = self.out
        sock = self.sock
        while out:
            try:
                if len(out) == 1:
                    sent = sock.send(out[0])
                elif self.out_size <= _JOIN_LIMIT:
                    joined = b"".join(out)
                    out[:] = [joined]
                    sent = sock.send(joined)
                else:
                    sent = sock.sendmsg(out[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("connection %d: send failed: %s", self.fd, exc)
                self.proto.close()  # the peer is gone: the loop closes the socket
                self.lost = True
                out.clear()
                self.out_size = 0
                if self._waiting:
                    self._drained.notify_all()
                return
            self.out_size -= sent
            self.written += sent
            self.stalled_since = time.monotonic()
            while sent:
                size = len(out[0])
                if sent >= size:
                    sent -= size
                    del out[0]
                else:
                    out[0] = memoryview(out[0])[sent:]
                    sent = 0
            if once:
                break
        if not out:
            self.stalled_since = None
        if self._waiting and self.out_size <= LOW_WATER:
            self._drained.notify_all()
