"""Apps for tests/test_attack.py: the hostile-user findings, one app each."""

from __future__ import annotations

import os
import threading
import time

from wsgi_app.deferred import DeferredMiddleware, defer

OK = [("Content-Type", "text/plain")]


def broken_log_fields(environ, start_response):
    """Replaces the access log's fields with something that is not a dict."""
    environ["fcgi.log_fields"] = None
    start_response("200 OK", OK)
    return [b"ok"]


def finish_from_thread(environ, start_response):
    """Calls fcgi.finish_request from a thread of its own, while the app still runs."""
    start_response("200 OK", OK)
    thread = threading.Thread(target=environ["fcgi.finish_request"])
    thread.start()
    thread.join()
    return [b"never sent"]


def sleepy(environ, start_response):
    """Sleeps QUERY_STRING seconds, then answers with the path."""
    time.sleep(float(environ["QUERY_STRING"] or 0))
    start_response("200 OK", OK)
    return [environ["PATH_INFO"].encode()]


def _note(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def _defer_again(environ, path: str) -> None:
    defer(environ, _note, path, "nested")


def _fork_and_return(path: str) -> None:
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        _note(path, "parent")
    # the child returns into the executor, as a careless call would


async def _block_the_loop() -> None:
    time.sleep(1.5)  # a blocking call inside a coroutine: the whole loop waits


def _deferring(environ, start_response):
    path = os.environ["TEST_APP_LOG"]
    what = environ["PATH_INFO"].strip("/")
    if what == "nested":
        defer(environ, _defer_again, environ, path)
    elif what == "fork":
        defer(environ, _fork_and_return, path)
    elif what == "block":
        defer(environ, _block_the_loop)
    defer(environ, _note, path, f"after {what}")
    start_response("200 OK", OK)
    return [b"ok"]


deferring = DeferredMiddleware(_deferring)


class _Unbound:
    """A callable whose every attribute raises, as an unbound ``LocalProxy`` does."""

    def __getattr__(self, name):
        raise RuntimeError(f"working outside of a context: {name}")

    def __call__(self):
        _note(os.environ["TEST_APP_LOG"], "proxy ran")


def _deferring_proxy(environ, start_response):
    defer(environ, _Unbound())
    defer(environ, _note, os.environ["TEST_APP_LOG"], "after proxy")
    start_response("200 OK", OK)
    return [b"ok"]


deferring_proxy = DeferredMiddleware(_deferring_proxy)


def _deferring_helper(environ, start_response):
    what = environ["PATH_INFO"].strip("/")
    if what == "exit":
        defer(environ, os._exit, 0)  # the helper process ends under the call
    defer(environ, _note_pid, os.environ["TEST_APP_LOG"], f"after {what}")
    start_response("200 OK", OK)
    return [b"ok"]


def _note_pid(path: str, text: str) -> None:
    _note(path, f"{text} in {os.getpid()}")


deferring_helper = DeferredMiddleware(_deferring_helper, process=True)


def stuck(environ, start_response):
    """Notes that it runs, then sleeps QUERY_STRING seconds (past any graceful stop)."""
    _note(os.environ["TEST_APP_LOG"], "running")
    return sleepy(environ, start_response)


def forking(environ, start_response):
    """Forks; the child returns into the worker as a careless app's would."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        start_response("200 OK", OK)
        return [b"parent"]
    start_response("200 OK", OK)
    return [b"child"]


def moving(environ, start_response):
    """Changes the process's folder to QUERY_STRING (when given), as a careless app may."""
    if environ["QUERY_STRING"]:
        os.chdir(environ["QUERY_STRING"])
    start_response("200 OK", OK)
    return [b"ok"]
