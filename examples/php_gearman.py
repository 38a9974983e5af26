"""PHP's Gearman, Swoole task workers, Kafka/RocketMQ consumers: work on other machines.

PHP::

    $client = new GearmanClient(); $client->addServer();
    $client->doBackground("transcode", $name);   // a job server, workers, your own glue

Here the same ``defer()`` goes to Celery when ``DEFERRED_CELERY`` (or ``celery=``) names
a broker (Redis, RabbitMQ; Kafka through Kombu's transport): each request's calls are
one task, run in order by ``celery -A wsgi_app.celery worker`` on any machine, failures
logged there with the request they came from.

    DEFERRED_CELERY=redis://127.0.0.1:6379/0 celery -A wsgi_app.celery worker &
    DEFERRED_CELERY=redis://127.0.0.1:6379/0 python -m fcgi --bind 127.0.0.1:9000 \\
        examples.php_gearman:application
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def transcode(name: str, quality: int) -> None:
    note(f"transcoded {name} at {quality}")


def app(environ, start_response):
    name = parse_qs(environ.get("QUERY_STRING", "")).get("name", ["clip"])[0]
    defer(environ, transcode, name, quality=720)  # runs in a Celery worker
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"queued\n"]


application = DeferredMiddleware(
    app, celery=os.environ.get("DEFERRED_CELERY") or "redis://127.0.0.1:6379/0"
)
