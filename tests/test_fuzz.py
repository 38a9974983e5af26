"""Property tests: whatever bytes arrive, the parser and the worker neither crash nor hang."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgi.wire import records
from fcgi.wire.connection import BodyReceived, Connection, ConnState, RequestAborted, RequestReady
from tests import apps
from tests.conftest import served
from tests.fcgi_client import begin, params, record, stdin

# Bytes that look enough like FastCGI to get past the first check now and then.
record_bytes = st.lists(
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
    record_bytes,
    st.tuples(record_bytes, st.binary(max_size=40)).map(lambda t: t[0] + t[1]),
)


@given(st.lists(noise, max_size=4))
def test_sans_io_connection_only_ever_raises_protocol_error(chunks):
    """Fed in pieces, the connection state machine answers, emits events, or calls the
    bytes a protocol error (and is closed for good); nothing else escapes."""
    conn = Connection({"FCGI_MPXS_CONNS": "0"}, max_params=4096)
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except records.ProtocolError:
            assert conn.state is ConnState.CLOSED
            return
        assert all(isinstance(e, (BodyReceived, RequestReady, RequestAborted)) for e in events)
        assert all(isinstance(part, bytes) for part in conn.data_to_send())


def _outcome(conn: Connection, chunks: list[bytes]) -> tuple[list, list[bytes], bool]:
    """What the connection made of ``chunks``: its events (as comparable tuples), its
    answers, and whether it called the bytes a protocol error."""
    events: list = []
    answers: list[bytes] = []
    try:
        for chunk in chunks:
            for event in conn.receive_data(chunk):
                if isinstance(event, BodyReceived):
                    events.append(("body", event.request.id, event.data))
                elif isinstance(event, RequestReady):
                    req = event.request
                    events.append(("ready", req.id, req.params, req.error))
                else:
                    events.append(("aborted", event.request_id))
            answers += conn.data_to_send()
    except records.ProtocolError:
        return events, answers, True
    return events, answers, False


@given(st.lists(noise, max_size=4), st.data())
def test_the_parser_makes_the_same_of_bytes_however_they_are_cut(chunks, data):
    """The one record parser (``Connection.receive_data``) fed the same bytes whole, or cut
    at any points (a record split across reads, a header cut in two), gives the same
    verdict and, for valid bytes, the same events and answers (bytes that break the
    protocol close the connection: what came before them in the same read is moot)."""
    whole = b"".join(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    at_once = _outcome(Connection({}, max_params=4096), [whole])
    in_pieces = _outcome(Connection({}, max_params=4096), pieces)
    assert in_pieces[2] == at_once[2]
    if not at_once[2]:
        assert in_pieces[0] == at_once[0]
        assert b"".join(in_pieces[1]) == b"".join(at_once[1])


@given(st.binary(max_size=600))
def test_pair_parser_returns_or_raises_protocol_error(data):
    try:
        pairs = records.decode_pairs(data)
    except records.ProtocolError:
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
