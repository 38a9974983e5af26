"""One FastCGI request: its params and body as they arrive, then the WSGI call.

The I/O loop fills a ``Request`` record by record; a runner thread then calls
``run``. The response goes out through the ``Connection``; ``finish`` sends
what is pending plus END_REQUEST exactly once and frees the connection, which
is what ``environ["fcgi.finish_request"]`` is.
"""

from __future__ import annotations

import functools
import io
import logging
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol

if TYPE_CHECKING:
    from .connection import Connection
    from .server import Server

log = logging.getLogger("fcgi")

# PEP 3333 keeps these as CONTENT_TYPE/CONTENT_LENGTH only.
_NOT_IN_WSGI = ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")


class Request:
    """State of one request on a connection, from BEGIN_REQUEST to END_REQUEST."""

    __slots__ = (
        "_body",
        "_body_size",
        "_params",
        "_pending",
        "aborted",
        "app_phase",
        "body_bytes",
        "conn",
        "dropped",
        "environ",
        "finished",
        "headers",
        "headers_sent",
        "id",
        "keep_conn",
        "on_early_finish",
        "outside_mount",
        "params",
        "running",
        "sent",
        "seq",
        "started",
        "status",
    )

    def __init__(self, conn: Connection, request_id: int, keep_conn: bool) -> None:
        self.conn = conn
        self.id = request_id
        self.keep_conn = keep_conn
        self._params = bytearray()
        self.params: dict[str, str] | None = None
        self._body: list[bytes] | Any = []
        self._body_size = 0
        self.running = False
        self.seq = 0  # this worker's count of requests when this one became ready
        self.environ: dict[str, Any] = {}
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False
        self._pending: list[bytes] = []
        self.finished = False
        self.aborted = False
        self.app_phase = False
        self.sent = 0
        self.body_bytes = 0
        self.started = 0.0
        self.dropped = 0
        self.on_early_finish: Callable[[], None] | None = None
        self.outside_mount = False

    # -- filled by the I/O loop -------------------------------------------------

    def add_params(self, content: bytes, limit: int) -> None:
        if self.params is not None:
            raise protocol.ProtocolError("PARAMS after the params stream ended")
        if content:
            self._params += content
            if len(self._params) > limit:
                raise protocol.ProtocolError(f"params exceed {limit} bytes")
        else:
            self.params = protocol.decode_pairs(self._params)
            self._params = bytearray()

    def add_stdin(self, content: bytes, spool_threshold: int) -> bool:
        """Store a STDIN record; True once the stream has ended and the request can run."""
        if self.params is None:
            raise protocol.ProtocolError("STDIN before the params stream ended")
        if not content:
            return True
        self._body_size += len(content)
        declared = self.params.get("CONTENT_LENGTH")
        if declared and declared.isdigit() and self._body_size > int(declared):
            raise protocol.ProtocolError(f"STDIN longer than CONTENT_LENGTH {declared}")
        if isinstance(self._body, list):
            self._body.append(content)
            if self._body_size > spool_threshold:
                spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close_body()
                spool.writelines(self._body)
                self._body = spool
        else:
            self._body.write(content)
        return False

    def body(self) -> io.BufferedIOBase:
        if isinstance(self._body, list):
            return io.BytesIO(b"".join(self._body))
        self._body.seek(0)
        return self._body

    def close_body(self) -> None:
        if not isinstance(self._body, list):
            self._body.close()

    def describe(self) -> str:
        params = self.params or {}
        return f"{params.get('REQUEST_METHOD', '-')} {params.get('REQUEST_URI', '-')}"

    # -- the WSGI side, on a runner thread --------------------------------------

    def build_environ(self, server: Server) -> dict[str, Any]:
        env: dict[str, Any] = self.params  # type: ignore[assignment]
        for key in _NOT_IN_WSGI:
            env.pop(key, None)
        # The path as the web server decoded it, whatever it put in which variable,
        # cut at the mount point (REQUEST_URI, raw and undecoded, is never used).
        path = env.get("SCRIPT_NAME", "") + env.get("PATH_INFO", "")
        mount = server.options.mount
        env["SCRIPT_NAME"] = mount
        if not mount:
            env["PATH_INFO"] = path
        elif path == mount or path.startswith(mount + "/"):
            env["PATH_INFO"] = path[len(mount) :]
        else:
            env["PATH_INFO"] = path
            self.outside_mount = True
        env.setdefault("SERVER_NAME", "localhost")
        env.setdefault("SERVER_PORT", "80")
        env.setdefault("SERVER_PROTOCOL", "HTTP/1.1")
        env.setdefault("REQUEST_METHOD", "GET")
        env.setdefault("QUERY_STRING", "")
        https = env.get("HTTPS", "").lower() in ("on", "1") or env.get("REQUEST_SCHEME") == "https"
        env["wsgi.version"] = (1, 0)
        env["wsgi.url_scheme"] = "https" if https else "http"
        env["wsgi.input"] = self.body()
        env["wsgi.errors"] = server.error_stream
        # Requests that finish early go on beside the others, even with --threads 1.
        env["wsgi.multithread"] = server.options.threads > 1 or server.options.max_detached > 0
        env["wsgi.multiprocess"] = True
        env["wsgi.run_once"] = False
        env["wsgi.input_terminated"] = True
        env["fcgi.finish_request"] = self.finish
        env["fcgi.add_drain_hook"] = server.add_drain_hook
        env["fcgi.deferred_limits"] = server.deferred_limits
        env["fcgi.request_id"] = request_id = f"{server.pid}-{self.seq}"
        env["fcgi.add_stats_hook"] = server.add_stats_hook
        if server.access_log is not None:
            env["fcgi.log_fields"] = {}
            env["fcgi.log_deferred"] = functools.partial(server.access_log.deferred, request_id)
        self.environ = env
        return env

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None):
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if not isinstance(status, str) or len(status) < 4 or not status[:3].isdigit():
            raise ValueError(f"bad WSGI status {status!r}")
        for name, value in headers:
            if "\n" in name or "\n" in value or "\r" in name or "\r" in value or ":" in name:
                raise ValueError(f"bad response header {name!r}: {value!r}")
        self.status = status
        self.headers = headers
        return self.write

    def _head(self) -> bytes:
        lines = [f"Status: {self.status}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append("\r\n")
        self.headers_sent = True
        return "\r\n".join(lines).encode("latin-1")

    def _stdout(self, chunks: list[bytes]) -> list[bytes]:
        """STDOUT records for the headers (if not sent yet) and ``chunks``: small pieces
        joined into one record, large ones sliced as they are, without a copy."""
        if not self.headers_sent:
            chunks = [self._head(), *chunks]
        size = sum(map(len, chunks))
        if size <= protocol.MAX_CONTENT:
            return protocol.stream_records(protocol.STDOUT, self.id, b"".join(chunks))
        parts: list[bytes] = []
        for chunk in chunks:
            if chunk:
                parts += protocol.stream_records(protocol.STDOUT, self.id, chunk)
        return parts

    def write(self, data: bytes) -> None:
        """WSGI's write callable: send ``data`` now, or count it as dropped after finish."""
        if self.finished:
            self.dropped += len(data)
            return
        if not data:
            return
        if self.status is None:
            raise AssertionError("write() before start_response()")
        with self.conn.lock:
            if self.finished:
                self.dropped += len(data)
                return
            self.body_bytes += len(data) + sum(map(len, self._pending))
            parts = self._stdout([*self._pending, data])
            self._pending.clear()
            self.sent += self.conn.send(parts)

    def buffer(self, data: bytes) -> None:
        """Hold ``data`` to go out with END_REQUEST in one send (a list result's body)."""
        if self.finished:
            self.dropped += len(data)
        elif data:
            self._pending.append(data)

    def finish(self) -> bool:
        """Send the rest and END_REQUEST, free the connection; True the first time only."""
        with self.conn.lock:
            if self.finished:
                return False
            self.finished = True
            if not self.aborted:
                if self.status is None:
                    log.error("%s: finished before start_response; answering 500", self)
                    self.status = "500 Internal Server Error"
                    self.headers = [("Content-Type", "text/plain")]
                    self._pending = [b"Internal Server Error\n"]
                self.body_bytes += sum(map(len, self._pending))
                parts = (
                    self._stdout(self._pending) if self._pending or not self.headers_sent else []
                )
                self._pending = []
                parts.append(protocol.end_request(self.id, 0))
                self.sent += self.conn.send(parts)
            self.conn.request_finished(self)
        access_log = self.conn.server.access_log
        if access_log is not None:
            fields = self.environ.get("fcgi.log_fields", {})
            access_log.request(self, time.monotonic() - self.started, fields)
        if self.app_phase and self.on_early_finish is not None:
            self.on_early_finish()
        return True

    def abort(self) -> None:
        """The web server gave up on this request (FCGI_ABORT_REQUEST, under ``conn.lock``):
        END_REQUEST now; whatever the app still writes is dropped."""
        if self.finished:
            return
        self.finished = True
        self.aborted = True
        self.conn.send([protocol.end_request(self.id, 1)])
        self.conn.request_finished(self)

    def fail(self, exc_info: Any) -> None:
        """The app raised: answer 500 if nothing was sent yet, else cut the response short."""
        log.error("%s: application error", self, exc_info=exc_info)
        if not self.headers_sent and not self.finished:
            self.status = "500 Internal Server Error"
            self.headers = [("Content-Type", "text/plain")]
            self._pending = [b"Internal Server Error\n"]

    def __str__(self) -> str:
        return f"request {self.id} ({self.describe()})"
