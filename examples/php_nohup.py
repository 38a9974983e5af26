"""PHP's ``exec("cmd > /dev/null 2>&1 &")`` / ``nohup``: start a command and forget it.

PHP::

    exec("nohup ./report.sh > /dev/null 2>&1 &");  // no exit status, no output, no
                                                    // timeout; a zombie if nobody reaps it

Here ``run_after`` starts it once the visitor has the page, waits for it and reaps it
(never a zombie), kills its process group after ``timeout``, and logs the exit status
and the tail of its output with the request id.

    python -m fcgi --bind 127.0.0.1:9000 examples.php_nohup:application
"""

from __future__ import annotations

from wsgi_app.background import run_after
from wsgi_app.deferred import DeferredMiddleware

REPORT = "echo building report; echo 3 pages; echo 'warning: no logo' >&2; exit 3"


def app(environ, start_response):
    if environ["PATH_INFO"] == "/hang":
        run_after(environ, ["sleep", "60"], timeout=0.5)  # killed, reaped, logged
    else:
        run_after(environ, ["sh", "-c", REPORT], timeout=30)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"report started\n"]


application = DeferredMiddleware(app)
