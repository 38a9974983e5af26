"""One WSGI app per way an application can go wrong, found by path (/<case>), served
bare and wrapped in DeferredMiddleware by ``faults`` and ``faults_deferred``.

``BEFORE`` cases fail before anything reaches the wire: the worker must answer 500.
``AFTER`` cases fail once the headers and some body went out: the worker must cut
the connection without END_REQUEST.
"""

from __future__ import annotations

from wsgi_app.deferred import DeferredMiddleware

OK = [("Content-Type", "text/plain")]


class AppBaseException(BaseException):
    """Not an Exception: what a careless library might raise."""


def _raise(exc: BaseException):
    def app(environ, start_response):
        raise exc

    return app


def _raise_after_start(environ, start_response):
    start_response("200 OK", OK)
    raise RuntimeError("after start_response")


def _start_twice(environ, start_response):
    start_response("200 OK", OK)
    start_response("200 OK", OK)
    return [b"twice"]


def _body(*items):
    def app(environ, start_response):
        start_response("200 OK", OK)
        return list(items)

    return app


def _generator(*items):
    def app(environ, start_response):
        start_response("200 OK", OK)
        return iter(items)

    return app


def _status(status):
    def app(environ, start_response):
        start_response(status, OK)
        return [b"never"]

    return app


def _header(name, value):
    def app(environ, start_response):
        start_response("200 OK", [*OK, (name, value)])
        return [b"never"]

    return app


def _generator_raising_first(environ, start_response):
    def body():
        raise RuntimeError("before the first body item")
        yield b""

    start_response("200 OK", OK)
    return body()


def _write_then_raise(environ, start_response):
    write = start_response("200 OK", OK)
    write(b"partial")
    raise RuntimeError("after write")


def _yield_then_raise(environ, start_response):
    def body():
        yield b"partial"
        raise RuntimeError("mid-body")

    start_response("200 OK", OK)
    return body()


def _yield_then_str(environ, start_response):
    def body():
        yield b"partial"
        yield "a str"

    start_response("200 OK", OK)
    return body()


def _no_start_response(environ, start_response):
    return [b"no headers"]


BEFORE = {
    "raise": _raise(RuntimeError("boom")),
    "raise_after_start": _raise_after_start,
    "system_exit": _raise(SystemExit(3)),
    "keyboard_interrupt": _raise(KeyboardInterrupt()),
    "base_exception": _raise(AppBaseException("odd")),
    "start_twice": _start_twice,
    "str_body": _body("a str"),
    "str_in_generator": _generator("a str"),
    "none_body_item": _body(b"ok", None),
    "generator_raising_first": _generator_raising_first,
    "no_start_response": _no_start_response,
    "status_crlf": _status("200 OK\r\nSet-Cookie: injected=1"),
    "status_lf": _status("200 OK\nSet-Cookie: injected=1"),
    "status_nul": _status("200 OK\x00"),
    "status_not_latin1": _status("200 caf\u20ac"),
    "status_no_reason": _status("200"),
    "status_four_digits": _status("2000 OK"),
    "status_words": _status("OK"),
    "status_bytes": _status(b"200 OK"),
    "header_not_latin1": _header("X-Cafe", "caf\u20ac"),
    "header_crlf": _header("X-A", "a\r\nSet-Cookie: injected=1"),
    "header_nul": _header("X-A", "a\x00b"),
    "header_name_colon": _header("X-A: b", "c"),
    "header_name_space": _header("X A", "c"),
    "header_bytes": _header(b"X-A", b"c"),
}

AFTER = {
    "write_then_raise": _write_then_raise,
    "yield_then_raise": _yield_then_raise,
    "yield_then_str": _yield_then_str,
}


def _ok(environ, start_response):
    start_response("200 OK", [*OK, ("Content-Length", "3")])
    return [b"ok\n"]


def _faults(environ, start_response):
    name = environ["PATH_INFO"].strip("/")
    app = BEFORE.get(name) or AFTER.get(name) or _ok
    return app(environ, start_response)


faults = _faults
faults_deferred = DeferredMiddleware(_faults)
