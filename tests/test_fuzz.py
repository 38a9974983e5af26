"""Property tests: whatever bytes arrive, the parser and the worker neither crash nor hang."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgi import protocol
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
