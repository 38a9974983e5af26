"""One FastCGI connection as a state machine with no I/O, in the spirit of h11.

Bytes in (``receive_data``), events out (``BodyReceived``, ``RequestReady``,
``RequestAborted``); responses in (``stdout``, ``end_request``, ``cut``), bytes
out. No sockets, threads, locks or WSGI: the I/O side (``io.channel.Channel``)
owns the socket and calls this under its own lock, and whoever keeps a body
(``wsgi.input``) makes it from the ``BodyReceived`` events. The records only
the protocol cares about (FCGI_GET_VALUES, unknown types, refused requests,
aborts of requests not yet running) are answered here and wait in
``data_to_send()``.

Requests are kept by request id, so several per connection (FCGI_MPXS_CONNS)
fit; with ``multiplex`` off a second concurrent BEGIN_REQUEST is refused with
CANT_MPX_CONN.

A request the web server gives up on (ABORT_REQUEST, or the connection closing
or breaking under it) gets ``IncomingRequest.aborted`` set here, a plain flag:
whoever runs it reads the flag before each piece of the response and stops.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from . import records

log = logging.getLogger("fcgi")

MAX_CONTENT_LENGTH_DIGITS = 18  # below 2**63: fits every signed 64-bit field downstream
_IGNORED_MAX = 64  # ids of ended or refused requests whose late records are dropped

_HEADER_FROM = records.HEADER.unpack_from
_BEGIN = records.BEGIN_REQUEST
_PARAMS = records.PARAMS
_STDIN = records.STDIN
_ACCEPTED_TYPES = frozenset(
    (
        records.BEGIN_REQUEST,
        records.ABORT_REQUEST,
        records.PARAMS,
        records.STDIN,
        records.DATA,
    )
)


class ConnState(enum.Enum):
    """Where the connection stands."""

    IDLE = "idle"  # no request on it: the web server may send the next one
    ACTIVE = "active"  # a request is arriving or running
    CLOSING = "closing"  # to close once its output is sent (no keep-conn, or stopping)
    CLOSED = "closed"  # broken or cut: nothing more goes in or out


class RequestState(enum.Enum):
    """Where one request stands, from BEGIN_REQUEST until it ends (and is forgotten)."""

    PARAMS = "params"  # receiving the params stream
    STDIN = "stdin"  # receiving the body
    READY = "ready"  # complete and handed over; later STDIN is dropped


class IncomingRequest:
    """What the web server sent for one request: its params, and how much body came.

    The body's bytes are handed out as ``BodyReceived`` events; ``body`` is where the
    side that keeps them (the WSGI side's ``wsgi.input``) may hold what it made."""

    __slots__ = (
        "_params",
        "_params_size",
        "aborted",
        "body",
        "content_length",
        "error",
        "id",
        "keep_conn",
        "params",
        "received",
        "replied",
        "state",
    )

    def __init__(self, request_id: int, keep_conn: bool) -> None:
        self.id = request_id
        self.keep_conn = keep_conn
        self.state = RequestState.PARAMS
        self._params: list[bytes] = []  # the records' contents (one, usually: never copied)
        self._params_size = 0
        self.params: dict[str, str] = {}
        self.body: Any = None  # the consumer's, made from the BodyReceived events
        self.received = 0  # body bytes received
        self.content_length: int | None = None
        self.error: str | None = None  # why the request is bad (answered 400, never run)
        # The web server gave up on it (ABORT_REQUEST) or its connection broke: set here,
        # read by whoever runs it before each piece of the response (no lock: a flag).
        self.aborted = False
        self.replied = False  # some of its response has gone out (STDOUT records)


@dataclass(slots=True)
class BodyReceived:
    """Bytes of a request's body (STDIN) arrived, in order; complete at ``RequestReady``."""

    request: IncomingRequest
    data: bytes


@dataclass(slots=True)
class RequestReady:
    """A request is complete (or known bad: ``request.error``) and can run."""

    request: IncomingRequest


@dataclass(slots=True)
class RequestAborted:
    """The web server aborted a running request; END_REQUEST has been queued for it
    and ``IncomingRequest.aborted`` is set."""

    request_id: int


Event = BodyReceived | RequestReady | RequestAborted


def parse_content_length(text: str) -> int | None:
    """CONTENT_LENGTH as a number of bytes (None when empty); ValueError unless it is
    1 to 18 ASCII digits: ``int()`` alone accepts Unicode digits, signs and spaces."""
    if not text:
        return None
    if len(text) > MAX_CONTENT_LENGTH_DIGITS or not (text.isascii() and text.isdigit()):
        raise ValueError(f"CONTENT_LENGTH {text[:40]!r} is not a number of bytes")
    return int(text)


class Connection:
    """The protocol state of one web server connection; no I/O."""

    def __init__(
        self,
        values: dict[str, str],
        max_params: int = 1 << 20,
        multiplex: bool = False,
        max_requests: int = 0,
    ) -> None:
        self.values = values  # FCGI_GET_VALUES answers
        self.max_params = max_params
        self.multiplex = multiplex
        # requests on it at once, each of which may hold max_params: more are refused
        # (OVERLOADED); 0: no limit
        self.max_requests = max_requests
        self.state = ConnState.IDLE
        self.requests: dict[int, IncomingRequest] = {}
        self.fresh = True  # no request begun on it yet
        # Close after the last response: the worker stops, or a request did not ask to
        # keep the connection.
        self.close_when_done = False
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._ignored: set[int] = set()
        self._arriving = 0  # requests begun and not yet complete
        self._told_overloaded = False

    # -- bytes in, events out ------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the peer; return what they completed. ``ProtocolError`` (and
        the state CLOSED) when they are not valid FastCGI."""
        if self.state is ConnState.CLOSED:
            return []
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
        events: list[Event] = []
        pos, end = 0, len(data)
        unpack = _HEADER_FROM
        requests = self.requests
        try:
            # The records of a request (BEGIN_REQUEST, PARAMS, the empty PARAMS and
            # STDIN) are handled inline; the rest in _record.
            while end - pos >= 8:
                version, rtype, rid, clen, plen = unpack(data, pos)
                if version != 1:
                    raise records.ProtocolError(f"bad record version {version}")
                start = pos + 8
                stop = start + clen
                if stop + plen > end:
                    break
                pos = stop + plen
                request = requests.get(rid)
                if request is None or request.state is RequestState.READY:
                    if rtype == _BEGIN and rid:
                        self._begin(rid, data[start:stop])
                    else:
                        self._record(rtype, rid, data[start:stop], events)
                elif rtype == _PARAMS and request.state is RequestState.PARAMS:
                    if clen:
                        request._params.append(data[start:stop])
                        request._params_size += clen
                        if request._params_size > self.max_params:
                            raise records.ProtocolError(f"params exceed {self.max_params} bytes")
                    else:
                        self._params_ended(request, events)
                elif rtype == _STDIN and not clen and request.state is RequestState.STDIN:
                    self._ready(request, events)
                else:
                    self._record(rtype, rid, data[start:stop], events)
        except records.ProtocolError:
            self._broken()
            raise
        if pos < end:
            self._buf = bytearray(data[pos:])
        elif self._buf:
            self._buf = bytearray()
        return events

    @property
    def receiving(self) -> bool:
        """True while a record or a request is half-sent (the read timeout applies)."""
        return self._arriving > 0 or bool(self._buf)

    @property
    def has_answers(self) -> bool:
        """True when the protocol queued answers of its own (see ``data_to_send``)."""
        return bool(self._out)

    def data_to_send(self) -> list[bytes]:
        """The protocol's own answers queued since the last call."""
        out, self._out = self._out, []
        return out

    def _record(self, rtype: int, rid: int, content: bytes, events: list[Event]) -> None:
        """The records ``receive_data`` does not handle inline: those of no request on
        the connection, records out of order, a body's content, other types."""
        request = self.requests.get(rid)
        if request is None or rtype == records.BEGIN_REQUEST or rtype == records.ABORT_REQUEST:
            self._other_record(request, rtype, rid, content, events)
            return
        state = request.state
        if state is RequestState.READY:
            return  # the rest of a body nobody will read (a request answered 400)
        if rtype == records.PARAMS:  # (while the params stream is open: inline)
            raise records.ProtocolError("PARAMS after the params stream ended")
        if rtype == records.STDIN:  # (its empty end record: inline)
            if state is not RequestState.STDIN:
                raise records.ProtocolError("STDIN before the params stream ended")
            request.received += len(content)
            declared = request.content_length
            if declared is not None and request.received > declared:
                raise records.ProtocolError(f"STDIN longer than CONTENT_LENGTH {declared}")
            events.append(BodyReceived(request, content))
        elif rtype not in _ACCEPTED_TYPES:
            self._out.append(records.unknown_type(rtype))
        # DATA belongs to the FILTER role, which is refused: nothing to do.

    def _params_ended(self, request: IncomingRequest, events: list[Event]) -> None:
        request.params = params = records.decode_pairs(b"".join(request._params))
        request._params = []
        length = params.get("CONTENT_LENGTH")
        if length:
            try:
                request.content_length = parse_content_length(length)
            except ValueError as exc:
                request.error = str(exc)
                self._ready(request, events)
                return
        elif length is not None:
            del params["CONTENT_LENGTH"]  # empty (nginx's stock params on a GET): none at all
        request.state = RequestState.STDIN

    def _ready(self, request: IncomingRequest, events: list[Event]) -> None:
        request.state = RequestState.READY
        self._arriving -= 1
        events.append(RequestReady(request))

    def _other_record(
        self,
        request: IncomingRequest | None,
        rtype: int,
        rid: int,
        content: bytes,
        events: list[Event],
    ) -> None:
        if rid == records.NULL_REQUEST_ID:
            if rtype == records.GET_VALUES:
                names = records.decode_pairs(content)
                self._out.append(records.get_values_result(names, self.values))
            else:
                log.warning("record type %d with request id 0; answered UNKNOWN_TYPE", rtype)
                self._out.append(records.unknown_type(rtype))
            return
        if rtype not in _ACCEPTED_TYPES:
            self._out.append(records.unknown_type(rtype))
            return
        if rtype == records.BEGIN_REQUEST:
            self._begin(rid, content)
            return
        if request is None:
            if rid in self._ignored:
                return  # late records of a request that ended: ignored, as the spec says
            raise records.ProtocolError(
                f"record type {rtype} for request {rid}, which was never begun"
            )
        # ABORT_REQUEST
        running = request.state is RequestState.READY
        request.aborted = True
        self._forget(request)
        self._out.append(records.end_request(rid, 1))
        if running:
            events.append(RequestAborted(rid))
        else:
            log.debug("request %d aborted by the web server before it was complete", rid)

    def _begin(self, rid: int, content: bytes) -> None:
        if len(content) < records.BEGIN_BODY.size:
            raise records.ProtocolError("short BEGIN_REQUEST body")
        role, flags = records.BEGIN_BODY.unpack_from(content)
        if rid in self.requests or (self.requests and not self.multiplex):
            log.debug("request %d refused: another request is active (CANT_MPX_CONN)", rid)
            self._ignore(rid)
            self._out.append(records.reject(rid, records.CANT_MPX_CONN))
        elif role != records.RESPONDER:
            log.debug("request %d refused: role %d (UNKNOWN_ROLE)", rid, role)
            self._ignore(rid)
            self._out.append(records.reject(rid, records.UNKNOWN_ROLE))
        elif self.max_requests and len(self.requests) >= self.max_requests:
            if not self._told_overloaded:  # once per connection: a peer may insist
                self._told_overloaded = True
                log.warning(
                    "request %d refused: %d requests already on its connection "
                    "(FCGI_MAX_REQS); answered OVERLOADED",
                    rid,
                    self.max_requests,
                )
            self._ignore(rid)
            self._out.append(records.reject(rid, records.OVERLOADED))
        else:
            self.requests[rid] = IncomingRequest(rid, bool(flags & records.KEEP_CONN))
            self._arriving += 1
            self.state = ConnState.ACTIVE
            self.fresh = False

    def _ignore(self, rid: int) -> None:
        ignored = self._ignored
        if rid not in ignored:
            if len(ignored) >= _IGNORED_MAX:  # a peer cycling ids gets no unbounded memory
                ignored.clear()
            ignored.add(rid)

    def _forget(self, request: IncomingRequest) -> None:
        del self.requests[request.id]
        if request.state is not RequestState.READY:
            self._arriving -= 1
        self._ignore(request.id)
        if not request.keep_conn:
            self.close_when_done = True  # once the others multiplexed with it have ended
        if not self.requests:
            if self.close_when_done:
                self.state = ConnState.CLOSING
            elif self.state is ConnState.ACTIVE:
                self.state = ConnState.IDLE

    # -- responses in, bytes out -----------------------------------------------------

    def _current(self, rid: int, incoming: IncomingRequest | None) -> IncomingRequest | None:
        """The request ``rid`` if it may still send output. ``incoming``, when given, must
        be that very request: after an ABORT_REQUEST the web server may begin a new one
        with the same id while the aborted app still runs, and its output is not theirs."""
        request = self.requests.get(rid)
        if request is None or self.state is ConnState.CLOSED:
            return None
        if incoming is not None and request is not incoming:
            return None
        return request

    def is_active(self, rid: int, incoming: IncomingRequest | None = None) -> bool:
        """True while ``rid`` may still send output."""
        return self._current(rid, incoming) is not None

    def stdout(
        self, rid: int, chunks: list[bytes], incoming: IncomingRequest | None = None
    ) -> list[records.Chunk] | None:
        """STDOUT records for ``chunks``; None when the request has ended (drop them)."""
        request = self._current(rid, incoming)
        if request is None:
            return None
        request.replied = True
        return records.stdout_records(rid, chunks)

    def framed(self, rid: int, incoming: IncomingRequest | None = None) -> bool:
        """Whether the caller may send STDOUT records it framed itself for ``rid`` (a file,
        read straight into records): False when the request has ended (drop them)."""
        request = self._current(rid, incoming)
        if request is None:
            return False
        request.replied = True
        return True

    def end_request(
        self,
        rid: int,
        chunks: list[bytes] | None = None,
        app_status: int = 0,
        incoming: IncomingRequest | None = None,
    ) -> list[records.Chunk] | None:
        """The last STDOUT records, the end of the stream and END_REQUEST; None when the
        request had already ended (aborted, cut, or the connection broke)."""
        request = self._current(rid, incoming)
        if request is None:
            return None
        if app_status:
            parts = records.stdout_records(rid, chunks) if chunks else []
            parts.append(records.end_request(rid, app_status))
        else:
            parts = records.last_records(rid, chunks or [])
        self._forget(request)
        return parts

    def cut(self, rid: int, incoming: IncomingRequest | None = None) -> None:
        """End the request without END_REQUEST: the connection must close, so the web
        server sees the response break off instead of taking it as complete. With
        ``incoming`` given, a request that already ended (aborted) cuts nothing."""
        if incoming is not None and self._current(rid, incoming) is None:
            return
        request = self.requests.pop(rid, None)
        if request is not None:
            self._ignore(rid)
            if request.state is not RequestState.READY:
                self._arriving -= 1
        self._broken()  # the others multiplexed on it go with the connection

    def expire(
        self, rid: int, answer: list[bytes], incoming: IncomingRequest | None = None
    ) -> list[records.Chunk] | None:
        """End a request the worker gave up on (``--request-timeout``): ``answer`` and
        END_REQUEST if none of its response has gone out yet, else a cut (``[]``: the
        connection closes). None when it had already ended."""
        request = self._current(rid, incoming)
        if request is None:
            return None
        if request.replied:
            self.cut(rid)
            return []
        return self.end_request(rid, answer, incoming=incoming)

    @property
    def arriving(self) -> bool:
        """True while a request has begun and is not yet complete."""
        return self._arriving > 0

    def ended_ids(self) -> list[int]:
        """Ids of requests that ended or were refused lately, whose late records (an
        ABORT the web server sent meanwhile) are dropped; handed on by a reload."""
        return sorted(self._ignored)

    def ignore_ids(self, ids: list[int]) -> None:
        for rid in ids:
            self._ignore(rid)

    def pending_bytes(self) -> bytes:
        """What was read and not yet parsed (part of a record), for a reload to hand on
        with the socket; only between requests, when nothing else is half-received."""
        return bytes(self._buf)

    def close(self) -> None:
        """The socket is gone (peer closed, reset, timed out): no more in or out."""
        self._broken()
        self._buf = bytearray()

    def _broken(self) -> None:
        """Nothing more goes in or out: every request still on it is aborted."""
        self.state = ConnState.CLOSED
        for request in self.requests.values():
            request.aborted = True
