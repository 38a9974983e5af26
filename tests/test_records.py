"""The wire format, checked against flup's independent implementation."""

from __future__ import annotations

import pytest
from flup.server import fcgi_base as flup

from fcgi.wire import records


def test_constants_match_flup():
    for name in (
        "BEGIN_REQUEST",
        "ABORT_REQUEST",
        "END_REQUEST",
        "PARAMS",
        "STDIN",
        "STDOUT",
        "STDERR",
        "DATA",
        "GET_VALUES",
        "GET_VALUES_RESULT",
        "UNKNOWN_TYPE",
        "KEEP_CONN",
        "RESPONDER",
        "AUTHORIZER",
        "FILTER",
        "REQUEST_COMPLETE",
        "CANT_MPX_CONN",
        "OVERLOADED",
        "UNKNOWN_ROLE",
    ):
        assert getattr(records, name) == getattr(flup, "FCGI_" + name), name
    assert records.HEADER.format == flup.FCGI_Header
    assert records.END_BODY.size == flup.FCGI_EndRequestBody_LEN


@pytest.mark.parametrize(
    "name,value",
    [
        ("A", ""),
        ("HTTP_X", "v" * 127),
        ("LONG", "v" * 128),
        ("N" * 200, "x" * 70000),
        ("UTF8", "caf\u00e9".encode().decode("latin-1")),
    ],
)
def test_pairs_decode_what_flup_encodes(name, value):
    data = flup.encode_pair(name.encode("latin-1"), value.encode("latin-1"))
    assert records.decode_pairs(data) == {name: value}


def test_pairs_encode_what_flup_decodes():
    pairs = {"SHORT": "1", "LONG": "y" * 300, "EMPTY": ""}
    data = records.encode_pairs(pairs)
    pos, decoded = 0, {}
    while pos < len(data):
        pos, (name, value) = flup.decode_pair(data, pos)
        decoded[name.decode()] = value.decode()
    assert decoded == pairs


@pytest.mark.parametrize("data", [b"\x05", b"\x05\x01AB", b"\x80\x00", b"\x01\x80\x00\x00"])
def test_truncated_pairs_are_protocol_errors(data):
    with pytest.raises(records.ProtocolError):
        records.decode_pairs(data)


def test_stream_records_split_at_65535():
    data = bytes(200_000)
    parts = records.stream_records(records.STDOUT, 7, data)
    lengths = [records.HEADER.unpack(bytes(h))[3] for h in parts[0::2]]
    assert lengths == [65535, 65535, 65535, 200_000 - 3 * 65535]
    assert b"".join(bytes(p) for p in parts[1::2]) == data


def test_end_request_is_empty_stdout_then_end():
    data = records.end_request(3, 0)
    assert records.HEADER.unpack_from(data) == (1, records.STDOUT, 3, 0, 0)
    assert records.HEADER.unpack_from(data, 8) == (1, records.END_REQUEST, 3, 8, 0)
    assert records.END_BODY.unpack_from(data, 16) == (0, records.REQUEST_COMPLETE)
