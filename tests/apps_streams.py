"""Apps for visitors who leave and requests that never end (tests/test_e2e_abort.py):
streams that note each chunk they make and when they are closed, an app stuck in a
call, a file sent with ``wsgi.file_wrapper``, the environ keys a request got."""

from __future__ import annotations

import time

from tests.apps import note, query_args


class Stream:
    """``count`` chunks of ``size`` bytes, ``gap`` seconds apart (``count`` 0: endless);
    notes ``pulled <tag> <n>`` for each chunk made and ``closed <tag> <n>`` at close()."""

    def __init__(self, tag: str, count: int, size: int, gap: float) -> None:
        self.tag, self.count, self.size, self.gap = tag, count, size, gap
        self.pulled = 0

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> bytes:
        if self.count and self.pulled >= self.count:
            raise StopIteration
        if self.pulled:
            time.sleep(self.gap)
        self.pulled += 1
        note(f"pulled {self.tag} {self.pulled}")
        return b"x" * self.size

    def close(self) -> None:
        note(f"closed {self.tag} {self.pulled}")


def app(environ, start_response):
    """``/stream?tag=T&count=N&size=B&gap=S``: a slow stream (count 0: endless);
    ``/stuck?S``: S seconds in the app before answering; ``/file?PATH``: that file
    through wsgi.file_wrapper; ``/upload``: the body's size; ``/environ``: which of
    CONTENT_LENGTH and CONTENT_TYPE the request's environ has; else ``ok``."""
    path = environ["PATH_INFO"]
    if path == "/stream":
        args = query_args(environ)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Stream(
            args.get("tag", "s"),
            int(args.get("count", "100")),
            int(args.get("size", "4096")),
            float(args.get("gap", "0.1")),
        )
    if path == "/stuck":
        time.sleep(float(environ["QUERY_STRING"]))
        body = b"woke up\n"
    elif path == "/file":
        name = environ["QUERY_STRING"]
        with open(name, "rb") as f:
            size = f.seek(0, 2)
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
        )
        return environ["wsgi.file_wrapper"](open(name, "rb"), 65536)
    elif path == "/upload":
        note("upload ran")
        body = f"{len(environ['wsgi.input'].read())}\n".encode()
    elif path == "/environ":
        keys = [k for k in ("CONTENT_LENGTH", "CONTENT_TYPE") if k in environ]
        body = (" ".join(f"{k}={environ[k]!r}" for k in keys) or "neither").encode()
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
