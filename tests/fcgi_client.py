"""A small FastCGI client for tests, built on flup's record and pair code.

Using flup's encoder and decoder here, not ours, means the tests check our
protocol code against an independent implementation.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
import termios

from flup.server import fcgi_base as flup

HEADER = struct.Struct("!BBHHBx")


def record(rtype: int, rid: int, content: bytes = b"") -> bytes:
    rec = flup.Record(rtype, rid)
    rec.contentData = content
    rec.contentLength = len(content)
    out = []

    class Sink:
        def fileno(self):
            return -1

        def send(self, data):
            out.append(bytes(data))
            return len(data)

    rec.write(Sink())
    return b"".join(out)


def begin(rid: int = 1, keep_conn: bool = True, role: int = flup.FCGI_RESPONDER) -> bytes:
    flags = flup.FCGI_KEEP_CONN if keep_conn else 0
    return record(
        flup.FCGI_BEGIN_REQUEST, rid, struct.pack(flup.FCGI_BeginRequestBody, role, flags)
    )


def params(rid: int, pairs: dict[str, str]) -> bytes:
    data = b"".join(
        flup.encode_pair(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs.items()
    )
    return record(flup.FCGI_PARAMS, rid, data) + record(flup.FCGI_PARAMS, rid)


def stdin(rid: int, body: bytes = b"") -> bytes:
    chunks = [body[i : i + 65535] for i in range(0, len(body), 65535)]
    return b"".join(record(flup.FCGI_STDIN, rid, c) for c in chunks) + record(flup.FCGI_STDIN, rid)


def body_of(events: list, request: object) -> bytes:
    """The body ``request`` received, from the sans-I/O connection's events."""
    return b"".join(
        e.data for e in events if hasattr(e, "data") and getattr(e, "request", None) is request
    )


def request_bytes(
    path: str = "/",
    method: str = "GET",
    body: bytes = b"",
    rid: int = 1,
    keep_conn: bool = True,
    extra: dict[str, str] | None = None,
) -> bytes:
    env = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path.split("?")[0],
        "QUERY_STRING": path.partition("?")[2],
        "REQUEST_URI": path,
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_LENGTH": str(len(body)) if body else "",
    }
    env.update(extra or {})
    return begin(rid, keep_conn) + params(rid, env) + stdin(rid, body)


class Response:
    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.end: tuple[int, int] | None = None
        self.records: list[tuple[int, int, bytes]] = []

    @property
    def status(self) -> int:
        return int(self.head.split(b"Status: ", 1)[1][:3])

    @property
    def head(self) -> bytes:
        return self.stdout.partition(b"\r\n\r\n")[0]

    @property
    def body(self) -> bytes:
        return self.stdout.partition(b"\r\n\r\n")[2]


class Client:
    """Speaks FastCGI over one socket; ``read_response`` collects until END_REQUEST."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_record(self) -> tuple[int, int, bytes] | None:
        while (
            len(self.buf) < 8
            or len(self.buf) < 8 + HEADER.unpack_from(self.buf)[3] + HEADER.unpack_from(self.buf)[4]
        ):
            data = self.sock.recv(262144)
            if not data:
                return None
            self.buf += data
        _v, rtype, rid, clen, plen = HEADER.unpack_from(self.buf)
        content = self.buf[8 : 8 + clen]
        self.buf = self.buf[8 + clen + plen :]
        return rtype, rid, content

    def read_response(self, rid: int = 1) -> Response:
        resp = Response()
        while True:
            rec = self.read_record()
            if rec is None:
                raise EOFError("connection closed before END_REQUEST")
            resp.records.append(rec)
            rtype, got_rid, content = rec
            if got_rid != rid:
                continue
            if rtype == flup.FCGI_STDOUT:
                resp.stdout += content
            elif rtype == flup.FCGI_STDERR:
                resp.stderr += content
            elif rtype == flup.FCGI_END_REQUEST:
                resp.end = struct.unpack(flup.FCGI_EndRequestBody, content)
                return resp

    def request(self, path: str = "/", **kwargs) -> Response:
        self.send(request_bytes(path, **kwargs))
        return self.read_response(kwargs.get("rid", 1))

    def unread(self) -> int:
        """Bytes sent that the worker has not read yet (unix sockets: kernel accounting,
        0 once it read everything), for waiting until it has what was sent."""
        queued = array.array("i", [0])
        fcntl.ioctl(self.sock, termios.TIOCOUTQ, queued)
        return queued[0]

    def close(self) -> None:
        self.sock.close()
