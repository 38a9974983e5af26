"""Property tests: whatever bytes arrive, the parser and the worker neither crash nor hang."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgi.wire import records as protocol
from fcgi.wire.connection import ConnState, FCGIConnection, RequestAborted, RequestReady
from tests import apps
from tests.conftest import served
from tests.fcgi_client import begin, params, record, stdin

# Bytes that look enough like FastCGI to get past the first check now and then.
records = st.lists(
    st.builds(
        lambda rtype, rid, content: record(rtype, rid, content),
        st.integers(0, 12),
        st.sampled_from([0, 1, 2, 65535]),
        st.binary(max_size=300),
    ),
    max_size=6,
).map(b"".join)
noise = st.one_of(
    st.binary(max_size=600),
    records,
    st.tuples(records, st.binary(max_size=40)).map(lambda t: t[0] + t[1]),
)


@given(st.lists(noise, max_size=4))
def test_sans_io_connection_only_ever_raises_protocol_error(chunks):
    """Fed in pieces, the connection state machine answers, emits events, or calls the
    bytes a protocol error (and is closed for good); nothing else escapes."""
    conn = FCGIConnection({"FCGI_MPXS_CONNS": "0"}, max_params=4096, spool_threshold=1024)
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except protocol.ProtocolError:
            assert conn.state is ConnState.CLOSED
            return
        assert all(isinstance(e, (RequestReady, RequestAborted)) for e in events)
        assert all(isinstance(part, bytes) for part in conn.data_to_send())


@given(noise)
def test_record_parser_returns_or_raises_protocol_error(data):
    try:
        found, used = protocol.parse_records(data)
    except protocol.ProtocolError:
        return
    assert 0 <= used <= len(data)
    assert all(isinstance(content, bytes) for _, _, content in found)


@given(st.binary(max_size=600))
def test_pair_parser_returns_or_raises_protocol_error(data):
    try:
        pairs = protocol.decode_pairs(data)
    except protocol.ProtocolError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=noise)
def test_worker_survives_any_bytes(tmp_path, caplog, data):
    with served(apps.echo, tmp_path / "fuzz.sock") as running, caplog.at_level(logging.WARNING):
        caplog.clear()
        running.client().send(data)
        good = running.client()
        good.send(
            begin(7)
            + params(7, {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "2"})
            + stdin(7, b"ok")
        )
        assert good.read_response(7).body == b"ok"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
