"""Apps for the day-one tests: who runs the app, and one that fails on /boom."""

from __future__ import annotations

import os


def whoami(environ, start_response):
    """The uid and gid the request runs as, and whether the worker can write var/."""
    body = f"uid={os.getuid()} gid={os.getgid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def fails(environ, start_response):
    if environ.get("PATH_INFO") == "/boom":
        raise RuntimeError("boom in the app")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


def dayone(environ, start_response):
    """/whoami answers the uid, /boom raises, anything else is ok."""
    if environ.get("PATH_INFO") == "/whoami":
        return whoami(environ, start_response)
    return fails(environ, start_response)
