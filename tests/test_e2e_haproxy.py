"""Behind real HAProxy with the shipped conf/haproxy.cfg: several requests at once on
each FastCGI connection (option mpxs-conns, http-reuse always)."""

from __future__ import annotations

import re
import signal
import threading

import pytest

from tests.gate import Gate
from tests.procs import HTTP, wait_for, web_server, worker

pytestmark = pytest.mark.e2e


def load(port: int, clients: int, requests: int, path: str) -> list[tuple[int, float]]:
    """``clients`` keep-alive clients at once, ``requests`` each: (status, seconds) per
    request, with 0 for a request that failed outright."""
    results: list[tuple[int, float]] = []

    def one(n: int) -> None:
        with HTTP(port, timeout=20) as client:
            for i in range(requests):
                try:
                    resp, body, took = client.get(path.format(n=n, i=i), "POST", b"x" * 100)
                    ok = resp.status if body == b"x" * 100 or "/php" in path else -1
                    results.append((ok, took))
                except OSError:
                    results.append((0, 0.0))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_haproxy_multiplexes_requests_on_few_connections(tmp_path):
    with (
        worker(
            tmp_path,
            "tests.apps_multiplex:slow_or_router",
            "--threads",
            "16",
            "--log-level",
            "debug",
        ) as (
            _proc,
            sock,
        ),
        web_server("haproxy", tmp_path / "haproxy", sock) as port,
    ):
        # Each request spends 50 ms in the app, so they overlap: without multiplexing
        # HAProxy would need a connection for each one running at once (up to 50).
        results = load(port, 50, 20, "/slow?0.05")
        statuses = [status for status, _ in results]
        assert len(statuses) == 1000
        assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}

        # PHP-style requests (finish, then work held at the gate) at once, within
        # --max-detached (16): each answer comes at its finish, so a multiplexed
        # connection's next request is never held back by the work after it (it would
        # wait for the gate, and time out).
        with Gate(tmp_path / "gate") as gate:
            results = load(port, 8, 2, "/php?gate=" + gate.path + "&tag={n}-{i}")
            assert [s for s, _ in results] == [200] * 16, "a finished request held back the next"

    text = (tmp_path / "app.log").read_text()
    opened = len(re.findall(r"connection \d+: opened", text))
    assert 0 < opened <= 10, f"{opened} FastCGI connections for 50 clients at once"
    assert "CANT_MPX_CONN" not in text


def test_reloads_under_multiplexed_load_fail_no_request(tmp_path):
    """SIGHUP twice while 16 clients POST through HAProxy: the multiplexed connections
    are kept across each exec and every request is answered 200."""
    with (
        worker(
            tmp_path,
            "tests.apps_multiplex:slow_or_router",
            "--threads",
            "4",
            "--log-level",
            "debug",
        ) as (proc, sock),
        web_server("haproxy", tmp_path / "haproxy", sock) as port,
    ):
        log = tmp_path / "app.log"
        results: list[tuple[int, float]] = []

        def reload_twice() -> None:
            for _ in range(2):
                before = log.read_text().count("serving on")
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda b=before: log.read_text().count("serving on") > b, 20, "reload")

        loader = threading.Thread(target=lambda: results.extend(load(port, 16, 60, "/slow?0.01")))
        before = log.read_text().count("opened")
        loader.start()
        wait_for(lambda: log.read_text().count("opened") > before, what="the load to begin")
        reload_twice()
        loader.join(60)
        assert proc.poll() is None
    statuses = [s for s, _ in results]
    assert len(statuses) == 16 * 60
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    text = log.read_text()
    assert text.count("restarting in place") == 2
    assert "keeping 0 connection(s)" not in text
