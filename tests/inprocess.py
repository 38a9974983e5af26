"""Call a WSGI app in-process, the way a WSGI server without finish_request does."""

from __future__ import annotations

from wsgiref.util import setup_testing_defaults


def _environ(path: str, query: str) -> dict:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, QUERY_STRING=query)
    return environ


def call(app, path: str, query: str = ""):
    """Returns (status, body, response); ``response.close()`` not yet called: the response
    is still going out, so deferred work must not have started."""
    answer = []
    response = app(
        _environ(path, query), lambda status, headers, exc_info=None: answer.append(status)
    )
    return answer[0], b"".join(response), response


def call_app(app, path: str = "/", query: str = "") -> tuple[str, bytes]:
    """The status and the body, the response closed (so deferred work is handed over);
    what the app or its body raised is raised here, after the close."""
    answer = []
    response = app(
        _environ(path, query), lambda status, headers, exc_info=None: answer.append(status)
    )
    try:
        body = b"".join(response)
    finally:
        close = getattr(response, "close", None)
        if close is not None:
            close()
    return answer[0], body
