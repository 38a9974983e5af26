"""PHP's ``curl_multi_*``: many HTTP requests at once, after the response.

PHP::

    $mh = curl_multi_init();
    foreach ($urls as $u) curl_multi_add_handle($mh, curl_init($u));
    do { curl_multi_exec($mh, $running); curl_multi_select($mh); } while ($running);

Here a deferred coroutine fans out with httpx's ``AsyncClient``: 20 calls of 0.2 s
end in about 0.2 s, on the worker's deferred loop, without a thread each; each
failure is raised and logged with the request, not left in a handle nobody reads.

    FAN_OUT_URL=http://127.0.0.1:8081/item python -m fcgi --bind 127.0.0.1:9000 \\
        examples.php_curl_multi:application
"""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import parse_qs

import httpx

from wsgi_app.deferred import DeferredMiddleware, defer

LOG = os.environ.get("EXAMPLE_LOG", "var/log/examples.log")
FAN_OUT_URL = os.environ.get("FAN_OUT_URL", "http://127.0.0.1:8081/item")


def note(text: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


async def fetch_all(urls: list[str]) -> None:
    """GET every URL at once; raise if any failed (the worker logs it)."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        responses = await asyncio.gather(*(client.get(url) for url in urls))
    for response in responses:
        response.raise_for_status()
    note(f"fetched {len(responses)} in {time.monotonic() - started:.3f} s")


def app(environ, start_response):
    count = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["20"])[0])
    defer(environ, fetch_all, [f"{FAN_OUT_URL}/{i}" for i in range(count)])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"fetching {count} URLs after this response\n".encode()]


application = DeferredMiddleware(app)
