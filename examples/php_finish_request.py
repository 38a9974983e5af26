"""PHP's ``fastcgi_finish_request()``: the visitor gets the page, the worker goes on.

PHP::

    echo "saved";
    fastcgi_finish_request();   // the visitor has the page
    send_mail();                // this PHP-FPM child serves nobody meanwhile

Here ``finish_request(environ)`` does the same mid-app (``/``); ``defer()`` (``/defer``)
also frees the thread that served the request, and logs a failure with its request.

    python -m fcgi --bind 127.0.0.1:9000 examples.php_finish_request:application
"""

from __future__ import annotations

import os
import time

from wsgi_app.deferred import DeferredMiddleware, defer, finish_request

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def send_mail(to: str) -> None:
    time.sleep(0.5)  # the slow part the visitor must not wait for
    note(f"mail sent to {to}")


def app(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/defer":
        defer(environ, send_mail, "ada@example.org")  # after the response, off this thread
        return [b"saved\n"]
    write(b"saved\n")
    finish_request(environ)  # PHP's call: the page and the connection are released now
    send_mail("grace@example.org")  # still on this request's thread, as in PHP
    return []


application = DeferredMiddleware(app)
