"""The sans-I/O FastCGI connection, with no sockets: record sequences in (valid and
invalid ones, as data files in tests/protocol_cases/), events and bytes out."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from flup.server import fcgi_base as flup

from fcgi.wire import records
from fcgi.wire.connection import (
    Connection,
    ConnState,
    RequestAborted,
    RequestReady,
    parse_content_length,
)
from tests.fcgi_client import HEADER, body_of, record

CASES = Path(__file__).parent / "protocol_cases"
VALUES = {"FCGI_MAX_CONNS": "10", "FCGI_MAX_REQS": "1", "FCGI_MPXS_CONNS": "0"}


def encode(rec) -> bytes:
    """A record of a case file: [type name or number, request id, content], where content
    is text (latin-1), {"raw": hex} bytes, a dict of pairs, or BEGIN's {role, keep}."""
    if isinstance(rec, dict):
        return bytes.fromhex(rec["raw"])
    rtype, rid, content = rec
    rtype = getattr(flup, "FCGI_" + rtype) if isinstance(rtype, str) else rtype
    if isinstance(content, dict) and "raw" in content:
        data = bytes.fromhex(content["raw"])
    elif isinstance(content, dict) and "role" in content:
        flags = flup.FCGI_KEEP_CONN if content["keep"] else 0
        data = struct.pack(flup.FCGI_BeginRequestBody, content["role"], flags)
    elif isinstance(content, dict):
        data = b"".join(
            flup.encode_pair(k.encode(), v.encode("latin-1")) for k, v in content.items()
        )
    else:
        data = content.encode("latin-1")
    return record(rtype, rid, data)


def decode_sent(data: bytes) -> list[list]:
    names = {getattr(records, n): n for n in ("STDOUT", "END_REQUEST", "GET_VALUES_RESULT")}
    names[records.UNKNOWN_TYPE] = "UNKNOWN_TYPE"
    statuses = {0: "REQUEST_COMPLETE", 1: "CANT_MPX_CONN", 2: "OVERLOADED", 3: "UNKNOWN_ROLE"}
    out, pos = [], 0
    while pos < len(data):
        _v, rtype, rid, clen, plen = HEADER.unpack_from(data, pos)
        content = data[pos + 8 : pos + 8 + clen]
        entry = [names[rtype], rid]
        if rtype == records.END_REQUEST:
            entry.append(statuses[records.END_BODY.unpack(content)[1]])
        out.append(entry)
        pos += 8 + clen + plen
    return out


def run(
    data: bytes | list[bytes], pieces: int = 1, multiplex: bool = False, close: bool = False
) -> tuple[Connection, list, list, str | None]:
    """Feed ``data`` in ``pieces`` (a list: one piece each); ``close``: then the peer goes
    (the socket closes). Returns the connection, the events seen (a ready request's entry
    ends with whether it is aborted at the end), the records sent and the protocol error."""
    conn = Connection(VALUES, max_params=4096, multiplex=multiplex)
    events: list = []
    sent = b""
    error = None
    if isinstance(data, bytes):
        step = max(1, len(data) // pieces) if pieces > 1 else len(data) or 1
        data = [data[start : start + step] for start in range(0, len(data), step)]
    try:
        for piece in data:
            events += conn.receive_data(piece)
            sent += b"".join(conn.data_to_send())
    except records.ProtocolError as exc:
        error = str(exc)
    if close:
        conn.close()
    seen = []
    for event in events:
        if isinstance(event, RequestReady):
            req = event.request
            body = body_of(events, req).decode("latin-1")
            seen.append(["ready", req.id, body, req.error, req.aborted])
        elif isinstance(event, RequestAborted):
            seen.append(["aborted", event.request_id])
    return conn, seen, decode_sent(sent), error


def cases(folder: str):
    return [
        pytest.param(json.loads(p.read_text()), id=p.stem)
        for p in sorted((CASES / folder).glob("*.json"))
    ]


@pytest.mark.parametrize("pieces", [1, 1000], ids=["whole", "byte_by_byte"])
@pytest.mark.parametrize("case", cases("valid"))
def test_valid_sequences(case, pieces):
    data = b"".join(encode(r) for r in case["records"])
    conn, events, sent, error = run(
        data,
        pieces if pieces == 1 else len(data),
        case.get("multiplex", False),
        case.get("close", False),
    )
    assert error is None
    for got, want in zip(events, case["events"], strict=True):
        assert got[:3] == want[:3]
        if want[0] == "ready":
            assert (got[3] is None) == (want[3] is None) and (want[3] or "") in (got[3] or "")
    # "aborted": the ids of the requests that must end up aborted, the others must not
    ready = [e for e in events if e[0] == "ready"]
    assert [e[1] for e in ready if e[4]] == case.get("aborted", [])
    assert sent == case["sent"]
    assert conn.state is ConnState(case["state"])


@pytest.mark.parametrize("case", cases("invalid"))
def test_invalid_sequences_are_protocol_errors(case):
    # one record per read: a request complete before the fault has been handed on
    conn, events, _sent, error = run([encode(r) for r in case["records"]])
    assert error is not None and case["error"] in error
    assert conn.state is ConnState.CLOSED
    # a request already running when the peer broke the protocol is aborted with it
    assert [e[1] for e in events if e[0] == "ready" and e[4]] == case.get("aborted", [])
    assert conn.receive_data(b"anything") == []  # a broken connection takes nothing more


def ready(conn: Connection, rid: int = 1, keep: bool = True):
    data = encode(["BEGIN_REQUEST", rid, {"role": 1, "keep": keep}])
    data += encode(["PARAMS", rid, {"REQUEST_METHOD": "GET"}]) + encode(["PARAMS", rid, ""])
    (event,) = conn.receive_data(data + encode(["STDIN", rid, ""]))
    return event.request


def test_response_bytes_and_states():
    conn = Connection(VALUES)
    assert conn.state is ConnState.IDLE and conn.fresh
    ready(conn)
    assert conn.state is ConnState.ACTIVE and not conn.receiving
    head = b"Status: 200 OK\r\n\r\n"
    assert decode_sent(b"".join(conn.stdout(1, [head, b"body"]))) == [["STDOUT", 1]]
    assert conn.stdout(1, [b""]) == []  # never an empty STDOUT mid-stream: it would end it
    parts = conn.end_request(1, [b"tail"])
    assert decode_sent(b"".join(parts)) == [
        ["STDOUT", 1],
        ["STDOUT", 1],
        ["END_REQUEST", 1, "REQUEST_COMPLETE"],
    ]
    assert conn.state is ConnState.IDLE and not conn.fresh
    assert conn.end_request(1) is None and conn.stdout(1, [b"late"]) is None  # ended: dropped
    assert conn.receive_data(encode(["STDIN", 1, "late"])) == []  # late records ignored
    ready(conn, keep=False)
    conn.end_request(1)
    assert conn.state is ConnState.CLOSING


def test_cut_closes_without_end_request():
    conn = Connection(VALUES)
    ready(conn)
    conn.cut(1)
    assert conn.state is ConnState.CLOSED
    assert conn.end_request(1) is None and not conn.is_active(1)


def test_requests_are_kept_by_id_so_multiplexing_fits():
    conn = Connection(VALUES, multiplex=True)
    first, second = ready(conn, 1), ready(conn, 2)
    assert set(conn.requests) == {1, 2} and (first.id, second.id) == (1, 2)
    conn.end_request(2)
    assert conn.state is ConnState.ACTIVE and conn.is_active(1) and not conn.is_active(2)
    conn.end_request(1)
    assert conn.state is ConnState.IDLE


def test_half_sent_is_receiving():
    conn = Connection(VALUES)
    conn.receive_data(encode(["BEGIN_REQUEST", 1, {"role": 1, "keep": True}])[:5])
    assert conn.receiving
    conn = Connection(VALUES)
    conn.receive_data(encode(["BEGIN_REQUEST", 1, {"role": 1, "keep": True}]))
    assert conn.receiving  # begun, params not complete


@pytest.mark.parametrize(
    "text,value",
    [("", None), ("0", 0), ("123", 123), ("9" * 18, 10**18 - 1)],
)
def test_content_length_accepted(text, value):
    assert parse_content_length(text) == value


@pytest.mark.parametrize(
    "text", ["\u00b2", "\u0661", "9" * 19, "-1", "+1", " 1", "1 ", "1e3", "0x10"]
)
def test_content_length_refused(text):
    with pytest.raises(ValueError, match="CONTENT_LENGTH"):
        parse_content_length(text)
