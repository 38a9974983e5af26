"""PHP's fire-and-forget ``fsockopen``: write an HTTP request, close without reading.

PHP::

    $fp = fsockopen("hooks.example.org", 80);
    fwrite($fp, "POST /hook HTTP/1.1\r\n...");
    fclose($fp);                // never reads the answer: a 500 or a timeout goes unseen

Here the whole HTTP call is deferred: made after the response, its answer read and
checked, and a failure (refused, 5xx, timeout) logged with the request it came from.

    HOOK_URL=http://127.0.0.1:8081/hook python -m fcgi --bind 127.0.0.1:9000 \\
        examples.php_fsockopen:application
"""

from __future__ import annotations

import json
import os
import urllib.request

from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")
HOOK_URL = os.environ.get("HOOK_URL", "http://127.0.0.1:8081/hook")


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def notify(url: str, payload: dict) -> None:
    """POST ``payload`` as JSON; an error status raises, so the worker logs it."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # raises on 4xx/5xx
        note(f"hook answered {response.status}")


def app(environ, start_response):
    defer(environ, notify, HOOK_URL, {"order": 42})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ordered\n"]


application = DeferredMiddleware(app)
