"""One request on the WSGI side: its environ, ``start_response``, the body out.

The I/O loop builds a ``Request`` from a complete ``IncomingRequest``; a
runner thread then calls ``call_app``. Output goes to the ``Channel``
(which owns the socket); ``finish`` sends what is pending plus END_REQUEST
exactly once, which is what ``environ["fcgi.finish_request"]`` is.

Whatever the app does wrong is answered here and never reaches the worker:
500 if nothing was sent yet, and once the headers are out, the connection is
cut without END_REQUEST so the web server cannot take the body as complete.

A request the web server gives up on (the visitor left: ABORT_REQUEST, or the
connection closed) stops: its iterable is not pulled again and is closed, and
a ``write()`` raises ``ClientDisconnected``; the access log records 499, as
nginx does. So does a response queued whole whose connection breaks while its
thread waits for it to drain: the bytes counted are those that went out (what
is still queued once it stops waiting, at most 256 KB, counts as sent, as what
sits in the kernel's buffers does).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .files import MAX_HEAD, Blocks, FileWrapper

if TYPE_CHECKING:
    from ..io.channel import Channel
    from ..wire.connection import IncomingRequest

log = logging.getLogger("fcgi")

# What PEP 3333 requires, for a web server that does not send it.
_REQUIRED = {
    "SERVER_NAME": "localhost",
    "SERVER_PORT": "80",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REQUEST_METHOD": "GET",
    "QUERY_STRING": "",
}
_STATUS = re.compile(r"[0-9]{3} [^\x00\r\n]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[^\x00\r\n]*")
_CHECKED_MAX = 512
_NO_BODY_STATUS = ("204", "304")  # responses that never carry a body, whatever the app sends
_PID = os.getpid()  # an app's child that returns into the worker must not answer
# Status lines and header lines already checked and encoded: apps send the same few
# again and again, so most responses skip the checks.
_checked_status: dict[str, bytes] = {}
_checked_headers: dict[tuple[str, str], bytes] = {}
_checked_heads: dict[tuple[Any, ...], bytes] = {}  # (status, *headers): the whole head


def _remember(cache: dict[Any, bytes], key: Any, line: bytes) -> None:
    """Keep ``line`` as checked; a cache that fills (an app sending ever new values,
    a date in a header) starts again rather than grow."""
    if len(cache) >= _CHECKED_MAX:
        cache.clear()
    cache[key] = line


def _status_line(status: str) -> bytes:
    line = _checked_status.get(status) if type(status) is str else None
    if line is None:
        if type(status) is not str or not _STATUS.fullmatch(status):
            raise ValueError(f"bad WSGI status {status!r}: want three digits, a space, a reason")
        try:
            line = f"Status: {status}\r\n".encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"response status is not latin-1: {status!r}") from None
        _remember(_checked_status, status, line)
    return line


def _header_line(header: tuple[str, str]) -> bytes:
    try:
        line = _checked_headers.get(header)
    except TypeError:  # not hashable: not a pair of str either
        line = None
    if line is None:
        try:
            name, value = header
        except (TypeError, ValueError):
            raise ValueError(f"bad response header {header!r}: want a (name, value) pair") from None
        if (
            type(name) is not str
            or type(value) is not str
            or not _HEADER_NAME.fullmatch(name)
            or not _HEADER_VALUE.fullmatch(value)
        ):
            raise ValueError(f"bad response header {name!r}: {value!r}")
        try:
            line = f"{name}: {value}\r\n".encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"response header is not latin-1: {name!r}: {value!r}") from None
        _remember(_checked_headers, (name, value), line)
    return line


class ClientDisconnected(ConnectionError):
    """Raised by WSGI ``write()`` once the web server has given up on the request (the
    visitor left: FCGI_ABORT_REQUEST, or the connection closed or broke). An ``OSError``,
    as other servers raise when a client is gone, so ``except OSError`` catches it
    anywhere; the worker logs nothing more than its one line for the abort."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNABORTED, "the web server gave up on the request")


class ErrorAnswer:
    """A response the worker gives itself when a request cannot be served."""

    def __init__(self, status: str, text: str) -> None:
        self.status = status
        self.body = text.encode() + b"\n"
        self.head = (
            f"Status: {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode()


SERVER_ERROR = ErrorAnswer("500 Internal Server Error", "Internal Server Error")
BAD_REQUEST = ErrorAnswer("400 Bad Request", "Bad Request")
GATEWAY_TIMEOUT = ErrorAnswer("504 Gateway Timeout", "Gateway Timeout")
GONE = "499 Client Closed Request"  # nginx's own code, for the access log


class Request:
    """One request from a complete ``IncomingRequest`` until its response has ended."""

    __slots__ = (
        "_head",
        "_pending",
        "body_bytes",
        "conn",
        "detached",
        "dropped",
        "environ",
        "error",
        "finished",
        "headers",
        "headers_sent",
        "in_app",
        "incoming",
        "no_body",
        "on_early_finish",
        "on_finish",
        "on_stream",
        "outside_mount",
        "request_id",
        "rid",
        "started",
        "status",
        "thread",
        "timed_out",
        "waited",
    )

    def __init__(self, conn: Channel, incoming: IncomingRequest) -> None:
        self.conn = conn
        self.incoming = incoming
        self.rid = incoming.id  # the FastCGI request id (nearly always 1), as the wire has it
        self.request_id = ""  # the worker's own: environ["fcgi.request_id"]
        self.waited = False  # it found every thread of the worker taken
        self.error = incoming.error  # why the request is refused with 400, if it is
        self.environ: dict[str, Any] = incoming.params  # type: ignore[assignment]
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self._head = b""
        self.headers_sent = False
        self._pending: list[bytes] = []
        self.finished = False
        self.in_app = False  # inside app() (not yet at close()): finishing detaches
        self.body_bytes = 0
        self.started = 0.0
        self.dropped = 0
        self.on_early_finish: Callable[[Request], None] | None = None
        # called before a lazy result is iterated (the inline runner: the loop may move)
        self.on_stream: Callable[[Request], None] | None = None
        self.no_body = False  # HEAD, 204 or 304: the body is dropped, the head sent
        self.thread = 0  # the thread serving it (its runner's); 0 once it has ended
        self.detached = False  # finished early and counted as detached by its runner
        self.on_finish: Callable[[Request], None] | None = None
        self.outside_mount = False
        self.timed_out = False  # --request-timeout ended it (its thread may still run)

    def describe(self) -> str:
        params = self.incoming.params
        return f"{params.get('REQUEST_METHOD', '-')} {params.get('REQUEST_URI', '-')}"

    def __str__(self) -> str:
        return f"request {self.request_id or self.rid} ({self.describe()})"

    def build_environ(self, base: dict[str, Any], mount: str) -> dict[str, Any]:
        """The WSGI environ: the params, the per-worker ``base`` keys, this request's own."""
        env = self.environ
        if "HTTP_CONTENT_TYPE" in env:
            del env["HTTP_CONTENT_TYPE"]
        if "HTTP_CONTENT_LENGTH" in env:
            del env["HTTP_CONTENT_LENGTH"]
        # nginx's stock params send it empty on a GET; left out, as waitress does (an empty
        # CONTENT_LENGTH is left out by the protocol, which reads it)
        if "CONTENT_TYPE" in env and not env["CONTENT_TYPE"]:
            del env["CONTENT_TYPE"]
        # The path as the web server decoded it, whatever it put in which variable,
        # cut at the mount point (REQUEST_URI, raw and undecoded, is never used).
        path = env.get("SCRIPT_NAME", "") + env.get("PATH_INFO", "")
        env["SCRIPT_NAME"] = mount
        if not mount:
            env["PATH_INFO"] = path
        elif path == mount or path.startswith(mount + "/"):
            env["PATH_INFO"] = path[len(mount) :]
        else:
            env["PATH_INFO"] = path
            self.outside_mount = True
        if not _REQUIRED.keys() <= env.keys():
            for key, value in _REQUIRED.items():
                env.setdefault(key, value)
        https = ("HTTPS" in env and env["HTTPS"].lower() in ("on", "1")) or env.get(
            "REQUEST_SCHEME"
        ) == "https"
        env.update(base)
        env["wsgi.url_scheme"] = "https" if https else "http"
        body = self.incoming.body
        env["wsgi.input"] = io.BytesIO() if body is None else body.stream()
        env["fcgi.finish_request"] = self.finish
        env["fcgi.request_id"] = self.request_id
        return env

    # -- what the app calls ------------------------------------------------------------

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        """WSGI's start_response: the status and headers are checked here (latin-1 text,
        no CR/LF/NUL, a status of three digits and a reason) so a bad one fails in the
        app, where it is answered 500, never on the wire."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            if self.timed_out:  # the worker answered for it (504): what comes is dropped
                return self.write
            raise AssertionError("start_response called twice without exc_info")
        try:
            key: tuple[Any, ...] | None = (status, *headers)
            head = _checked_heads.get(key)  # type: ignore[arg-type]
        except TypeError:  # something unhashable: checked (and refused) below
            key = head = None
        if head is None:
            lines = [_status_line(status)]
            for header in headers:
                lines.append(_header_line(header))
            lines.append(b"\r\n")
            head = b"".join(lines)
            if key is not None:
                _remember(_checked_heads, key, head)
        self.status = status
        self.headers = headers
        self._head = head
        return self.write

    def write(self, data: bytes) -> None:
        """WSGI's write callable: send ``data`` now, or count it as dropped after finish;
        ``ClientDisconnected`` once the web server has given up on the request."""
        if type(data) is not bytes and not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"response body items must be bytes, not {type(data).__name__}")
        if self.finished:
            self.dropped += len(data)
            return
        if not data or self.no_body:
            return
        if self.status is None:
            raise AssertionError("write() before start_response()")
        chunks = self._pending
        self._pending = []
        chunks.append(data)
        size = sum(map(len, chunks))
        if not self.headers_sent:
            self.headers_sent = True
            if self._bodyless():
                chunks = []
                size = 0
            chunks.insert(0, self._head)
        if not self.conn.send_stdout(self.rid, chunks, self.incoming):
            if self.timed_out:  # ended meanwhile from another thread (--request-timeout)
                self.dropped += len(data)
                return
            raise ClientDisconnected
        self.body_bytes += size

    def buffer(self, data: bytes) -> None:
        """Hold ``data`` to go out with END_REQUEST in one send (a list result's body)."""
        if type(data) is not bytes and not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"response body items must be bytes, not {type(data).__name__}")
        if self.finished:
            self.dropped += len(data)
        elif data:
            self._pending.append(data)

    def finish(self) -> bool:
        """Send the rest and END_REQUEST, free the connection; True the first time only."""
        if self.finished:
            return False
        self.finished = True
        if self.status is None:
            log.error("%s: the app returned without calling start_response; answered 500", self)
            self._answer(SERVER_ERROR)
        chunks = self._pending
        self._pending = []
        size = sum(map(len, chunks))
        if not self.headers_sent:
            self.headers_sent = True
            status: str = self.status  # type: ignore[assignment]
            # (a 204 or 304 has a 4 at [2], so most responses skip the call)
            maybe = status[2] == "4" or self.environ["REQUEST_METHOD"] == "HEAD"
            if maybe and self._bodyless():
                chunks = []
                size = 0
            chunks.insert(0, self._head)
        end = self.conn.end_request(self.rid, chunks, self.incoming)
        if end is not None:
            # queued whole; a peer that breaks off while this thread waits for the
            # output to drain (a large response) leaves part of it unsent: aborted
            unsent = self.conn.unsent(end)
            self.body_bytes += max(0, size - unsent)
            if unsent:
                self._gone()
        elif self.timed_out:  # --request-timeout ended it first, from its own thread
            return True
        else:
            self._gone()
        if self.on_finish is not None or self.in_app:
            self._ended()
        return True

    def _bodyless(self) -> bool:
        """HEAD, 204 or 304: only the head goes out (RFC 9110), the app's body is dropped;
        asked once, as the head goes out."""
        status: str = self.status  # type: ignore[assignment]  # set before any head goes out
        no_body = status[2] == "4" and status[:3] in _NO_BODY_STATUS
        self.no_body = no_body or self.environ["REQUEST_METHOD"] == "HEAD"
        return self.no_body

    def _gone(self) -> None:
        """The web server gave up on the request before its end went out: one line, and
        499 in the access log (the app's own status went out, or nothing did)."""
        log.info(
            "%s: the web server gave up on it (the visitor left) after %d body byte(s); stopped",
            self,
            self.body_bytes,
        )
        self.status = GONE

    # -- the worker's side ----------------------------------------------------------------

    def call_app(self, app: Callable[..., Iterable[bytes]]) -> None:
        """Run the app and send its response; any failure is answered, logged once with
        the request id, and stays here (SystemExit and KeyboardInterrupt included: stopping
        is the signal handlers' business, never the app's)."""
        result = None
        try:
            self.in_app = True
            result = app(self.environ, self.start_response)
            if os.getpid() != _PID:  # a fork in C runs no at-fork hook: compare pids
                _leave_forked_child(self)
            if isinstance(result, (list, tuple)):
                for chunk in result:
                    self.buffer(chunk)
            elif type(result) is FileWrapper:
                self._send_file(result)
            else:
                self._stream(result)
        except BaseException as exc:
            if os.getpid() != _PID:
                _leave_forked_child(self)
            self.in_app = False
            if type(exc) is not ClientDisconnected or not self.incoming.aborted:
                self.fail(sys.exc_info())
        finally:
            self.in_app = False
            close = None if type(result) is list else getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException:
                    self.fail(sys.exc_info())
            self.finish()

    def _stream(self, result: Iterable[bytes]) -> None:
        """Send a lazy result chunk by chunk; once the request is aborted, no chunk more is
        pulled (the one being made when it happened is dropped)."""
        if self.on_stream is not None:
            self.on_stream(self)
        incoming = self.incoming
        if incoming.aborted:
            return
        write = self.write
        for chunk in result:
            if incoming.aborted:
                return
            write(chunk)

    def _send_file(self, wrapper: FileWrapper) -> None:
        """``wsgi.file_wrapper``'s file, by blocks read straight into records (one read,
        one send each); iterated as any result if it has no descriptor to read."""
        blocks = Blocks.of(wrapper, self.rid)
        if blocks is None or self.status is None:
            self._stream(wrapper)
            return
        if self.on_stream is not None:
            self.on_stream(self)
        conn, incoming = self.conn, self.incoming
        head = b""
        if not self.headers_sent:
            if self._bodyless():
                return  # the head goes out alone with END_REQUEST
            head = self._head
            if len(head) > MAX_HEAD:  # too long to share a record with the file's start
                self.headers_sent = True
                if not conn.send_stdout(self.rid, [head], incoming):
                    raise ClientDisconnected
                head = b""
        try:
            while not incoming.aborted:
                start = blocks.offset
                block = blocks.next(conn.out_size, head)
                if block is None:
                    return
                if not conn.send_framed(self.rid, block, incoming):
                    if self.finished:  # ended from another thread (--request-timeout)
                        return
                    raise ClientDisconnected
                self.headers_sent = True
                self.body_bytes += blocks.offset - start
                head = b""
        finally:
            blocks.settle()

    def time_out(self) -> str | None:
        """``--request-timeout`` gave up on it, from the watchdog's thread while the app's
        own thread is still in it: 504 if none of the response went out, else a cut; what
        that thread sends later is dropped. Returns what became of the request, or None
        if its response had ended on its own meanwhile (the channel decides, under its
        lock, which of the two threads ends it)."""
        if self.finished:
            return "its response had ended (fcgi.finish_request); the app's thread is abandoned"
        answer = GATEWAY_TIMEOUT
        self.timed_out = True  # first: the app's thread, failing to send, drops its output
        sent = self.conn.expire(self.rid, [answer.head, answer.body], self.incoming)
        if sent is None and not self.incoming.aborted:
            self.timed_out = False  # the app's thread finished it first: nothing timed out
            return None
        self.finished = True
        if sent is None:
            outcome = "the web server had given up on it"
        elif sent:
            self.status = answer.status
            self.body_bytes = len(answer.body)
            outcome = "answered 504"
        else:
            self.status = "504 (cut)"
            outcome = "its response had begun: connection cut"
        if self.on_finish is not None:
            self.on_finish(self)
        return outcome

    def answer(self, error: ErrorAnswer) -> None:
        """Respond with one of the worker's own error answers (nothing of the app's)."""
        self._answer(error)
        self.finish()

    def _answer(self, error: ErrorAnswer) -> None:
        self.status = error.status
        self.headers = []
        self._head = error.head
        self._pending = [error.body]

    def fail(self, exc_info: Any) -> None:
        """The app failed: 500 if nothing was sent yet; once headers went out, cut the
        connection without END_REQUEST (a cut body must never look complete)."""
        if self.finished:
            log.error("%s: application error after the response ended", self, exc_info=exc_info)
            return
        if not self.headers_sent:
            log.error("%s: application error; answered 500", self, exc_info=exc_info)
            self.answer(SERVER_ERROR)
            return
        log.error(
            "%s: application error after the response began; connection cut",
            self,
            exc_info=exc_info,
        )
        self.finished = True
        self.status = "500 (cut)"
        self.conn.cut(self.rid, self.incoming)
        self._ended()

    def _ended(self) -> None:
        if self.on_finish is not None:
            self.on_finish(self)
        if self.in_app and self.on_early_finish is not None:
            self.on_early_finish(self)


def _leave_forked_child(request: Request) -> None:
    """The app forked and its child returned here: it must not answer the request (the
    parent does) nor go on as a second worker on the same sockets, so it exits."""
    log.error(
        "%s: the app forked and its child (pid %d) returned into the worker; the child "
        "exits: end a child with os._exit()",
        request,
        os.getpid(),
    )
    logging.shutdown()
    os._exit(1)
