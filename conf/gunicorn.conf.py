"""gunicorn, the HTTP alternative: nginx proxy_pass -> gunicorn -> the same WSGI app.

    .venv/bin/gunicorn -c conf/gunicorn.conf.py

gunicorn has no finish_request, so the middleware hands deferred work to its
executor from the response's close(): the visitor is answered and the worker
takes its next request at once. worker_exit drains that work when a worker
stops (restart, max_requests, SIGTERM), so accepted work is not lost;
post_worker_init lets a journal (DEFERRED_JOURNAL) take over a dead worker's calls
as soon as the new worker is up, not at its first request.
"""

import os

from wsgi_app.deferred import drain, started

wsgi_app = "wsgi_app.demo:application"  # a MODULE:CALLABLE on the command line wins
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")  # nginx proxy_passes here
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))  # processes; one per core is typical
worker_class = "sync"  # one request at a time per worker, like the FastCGI pool
graceful_timeout = 30  # seconds a stopping worker gets to finish
timeout = 60  # a worker silent this long is killed and replaced


def post_worker_init(worker):
    """The app is loaded in this worker: a journal takes its app's calls over now."""
    started()


def worker_exit(server, worker):
    """Run what this worker's requests deferred before it goes, within graceful_timeout."""
    abandoned = drain(graceful_timeout - 2)
    if abandoned:
        server.log.error("worker %s: %d deferred call(s) abandoned", worker.pid, abandoned)
