"""PHP's Redis list + cron worker: push a job, let a cron script pop it later.

PHP::

    $redis->lPush("jobs", json_encode(["thumbnail", $name]));   // a queue of your own
    // * * * * * php worker.php   -- pops with RPOP: a crash mid-job loses it

Here the journal does it on one machine with no second system: each deferred call is
written to SQLite before the visitor has the page, run at once by this worker, and if
the worker dies (kill -9, OOM) another worker on the same journal runs it.

    DEFERRED_JOURNAL=var/lib/deferred.sqlite3 python -m fcgi --bind 127.0.0.1:9000 \\
        examples.php_redis_cron:application
"""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs

from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def make_thumbnail(name: str) -> None:
    time.sleep(0.5)  # the slow part
    note(f"thumbnail {name}")


def app(environ, start_response):
    name = parse_qs(environ.get("QUERY_STRING", "")).get("name", ["photo"])[0]
    defer(environ, make_thumbnail, name)  # module-level function, plain data: it travels
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"uploaded\n"]


application = DeferredMiddleware(
    app, journal=os.environ.get("DEFERRED_JOURNAL") or "var/lib/deferred.sqlite3"
)
