"""The FastCGI 1.0 wire format: record types, headers and name-value pairs.

The constants and the pair codec follow the specification and flup's
``fcgi_base`` (the tests check them against flup). Records are parsed in one
place, ``connection.Connection.receive_data``; this module builds them.
"""

from __future__ import annotations

import struct

VERSION_1 = 1
HEADER_LEN = 8
MAX_CONTENT = 0xFFFF

BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

NULL_REQUEST_ID = 0
KEEP_CONN = 1

RESPONDER = 1
AUTHORIZER = 2
FILTER = 3

REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

# annotated for mypyc, which compiles this module when asked (see setup.py)
HEADER: struct.Struct = struct.Struct("!BBHHBx")
BEGIN_BODY: struct.Struct = struct.Struct("!HB5x")
END_BODY: struct.Struct = struct.Struct("!LB3x")
UNKNOWN_BODY: struct.Struct = struct.Struct("!B7x")
_LEN4: struct.Struct = struct.Struct("!L")


Chunk = bytes | memoryview  # a record's bytes, or a slice of a large body without a copy


class ProtocolError(Exception):
    """The peer sent bytes that are not valid FastCGI; the connection must close."""


def record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    """One record, unpadded (padding is optional and no web server needs it)."""
    return HEADER.pack(VERSION_1, rtype, request_id, len(content), 0) + content


def stream_records(rtype: int, request_id: int, data: bytes) -> list[Chunk]:
    """``data`` cut into records of at most 65535 bytes, headers and slices interleaved."""
    if len(data) <= MAX_CONTENT:
        return [HEADER.pack(VERSION_1, rtype, request_id, len(data), 0), data]
    view = memoryview(data)
    parts: list[Chunk] = []
    for start in range(0, len(data), MAX_CONTENT):
        chunk = view[start : start + MAX_CONTENT]
        parts.append(HEADER.pack(VERSION_1, rtype, request_id, len(chunk), 0))
        parts.append(chunk)
    return parts


def stdout_records(request_id: int, chunks: list[bytes]) -> list[Chunk]:
    """STDOUT records for ``chunks``: small pieces joined into one record, large ones
    sliced as they are, without a copy."""
    size = sum(map(len, chunks))
    if not size:
        return []  # an empty STDOUT record would end the stream
    if size <= MAX_CONTENT:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return [HEADER.pack(VERSION_1, STDOUT, request_id, size, 0), data]
    parts: list[Chunk] = []
    for chunk in chunks:
        if chunk:
            parts += stream_records(STDOUT, request_id, chunk)
    return parts


def last_records(request_id: int, chunks: list[bytes]) -> list[Chunk]:
    """The last STDOUT records for ``chunks``, the end of the stream and END_REQUEST;
    a small response is one bytes object, ready for one send."""
    end = end_request(request_id)
    size = sum(map(len, chunks))
    if not size:
        return [end]
    if size <= MAX_CONTENT:
        return [b"".join((HEADER.pack(VERSION_1, STDOUT, request_id, size, 0), *chunks, end))]
    parts = stdout_records(request_id, chunks)
    parts.append(end)
    return parts


_END_CACHE: dict[int, bytes] = {}


def end_request(request_id: int, app_status: int = 0, status: int = REQUEST_COMPLETE) -> bytes:
    """The empty STDOUT record that closes the stream, then END_REQUEST."""
    if not app_status and status == REQUEST_COMPLETE:
        cached = _END_CACHE.get(request_id)
        if cached is None:
            if len(_END_CACHE) > 256:
                _END_CACHE.clear()
            cached = _END_CACHE[request_id] = _end_request(request_id, 0, status)
        return cached
    return _end_request(request_id, app_status, status)


def _end_request(request_id: int, app_status: int, status: int) -> bytes:
    return HEADER.pack(VERSION_1, STDOUT, request_id, 0, 0) + record(
        END_REQUEST, request_id, END_BODY.pack(app_status & 0xFFFFFFFF, status)
    )


def reject(request_id: int, status: int) -> bytes:
    """END_REQUEST alone, for a request that never started (CANT_MPX_CONN, UNKNOWN_ROLE)."""
    return record(END_REQUEST, request_id, END_BODY.pack(0, status))


def unknown_type(rtype: int) -> bytes:
    return record(UNKNOWN_TYPE, NULL_REQUEST_ID, UNKNOWN_BODY.pack(rtype))


def encode_pairs(pairs: dict[str, str]) -> bytes:
    """Name-value pairs in FastCGI's length-prefixed form (names and values latin-1)."""
    out = bytearray()
    for name, value in pairs.items():
        for item in (name, value):
            n = len(item.encode("latin-1"))
            out += bytes([n]) if n < 128 else _LEN4.pack(n | 0x80000000)
        out += name.encode("latin-1") + value.encode("latin-1")
    return bytes(out)


def decode_pairs(data: bytes) -> dict[str, str]:
    """Parse name-value pairs; names and values become latin-1 str as PEP 3333 wants.

    The buffer is decoded once: latin-1 maps byte offsets to the same str offsets,
    so each name and value is a str slice rather than a decode of its own. This loop
    runs for every param of every request, so it is written out for speed: both
    lengths are read at once for the usual pair (both under 128 bytes), and a pair
    that overruns the buffer is caught once, at the end.
    """
    pairs: dict[str, str] = {}
    text = data.decode("latin-1")
    pos, end = 0, len(data)
    try:
        while pos < end:
            nlen = data[pos]
            vlen = data[pos + 1]
            if (nlen | vlen) & 0x80:
                if nlen & 0x80:
                    nlen = _LEN4.unpack_from(data, pos)[0] & 0x7FFFFFFF
                    pos += 4
                else:
                    pos += 1
                vlen = data[pos]
                if vlen & 0x80:
                    vlen = _LEN4.unpack_from(data, pos)[0] & 0x7FFFFFFF
                    pos += 4
                else:
                    pos += 1
            else:
                pos += 2
            mid = pos + nlen
            pos = mid + vlen
            pairs[text[mid - nlen : mid]] = text[mid:pos]
    except (IndexError, struct.error) as exc:
        raise ProtocolError("truncated name-value pair length") from exc
    if pos > end:
        raise ProtocolError("name-value pair longer than its record")
    return pairs


def get_values_result(names: dict[str, str], values: dict[str, str]) -> bytes:
    """Answer FCGI_GET_VALUES with the variables we know, ignoring the others."""
    known = {name: values[name] for name in names if name in values}
    return record(GET_VALUES_RESULT, NULL_REQUEST_ID, encode_pairs(known))
