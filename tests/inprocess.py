"""Call a WSGI app in-process, the way a server does, with its ``close()`` left to the test."""

from __future__ import annotations

from wsgiref.util import setup_testing_defaults


def call(app, path: str, query: str = ""):
    """Returns (status, body, response); ``response.close()`` not yet called: the response
    is still going out, so deferred work must not have started."""
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, QUERY_STRING=query)
    answer = []
    response = app(environ, lambda status, headers, exc_info=None: answer.append(status))
    return answer[0], b"".join(response), response
