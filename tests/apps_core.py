"""Apps for the tests of the I/O core (tests/test_core.py)."""

from __future__ import annotations

from tests.gate import wait_at


def request_id(environ, start_response):
    """The body is this request's fcgi.request_id."""
    body = environ["fcgi.request_id"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def sized(environ, start_response):
    """A body of QUERY_STRING bytes, streamed in 1 MB pieces."""
    size = int(environ.get("QUERY_STRING") or 10)
    piece = b"x" * min(size, 1 << 20)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def body():
        left = size
        while left > 0:
            yield piece[:left]
            left -= len(piece)

    return body()


def finish_then_wait(environ, start_response):
    """PHP style: answer, finish, then hold the thread at the gate named in QUERY_STRING."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    environ["fcgi.finish_request"]()
    wait_at(environ["QUERY_STRING"])
    return []
