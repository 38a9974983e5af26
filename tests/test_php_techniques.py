"""Every "Coming from PHP" example (docs/coming-from.md), run under the real worker."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fcgi_client import Client
from tests.procs import lines, python_env, wait_for, worker
from tests.test_celery import celery_worker, redis


def zombies_of(pid: int) -> int:
    """Children of ``pid`` that ended and were never reaped."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            count += 1
    return count


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers after ``server.delay`` s; /broken answers 500; keeps what was POSTed."""

    def do_GET(self) -> None:
        time.sleep(self.server.delay)  # type: ignore[attr-defined]
        status = 500 if self.path.startswith("/broken") else 200
        self.send_response(status)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posted.append(json.loads(body))  # type: ignore[attr-defined]
        self.do_GET()

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # 20 connections arrive at once
    daemon_threads = True


@contextlib.contextmanager
def http_server(delay: float) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.delay = delay  # type: ignore[attr-defined]
    server.posted = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def example(tmp: Path, name: str, name_suffix: str = "", **env: str):
    """The example module under the real worker, its notes in tmp/notes."""
    return worker(
        tmp,
        f"examples.{name}:application",
        env=python_env(EXAMPLE_LOG=str(tmp / "notes"), **env),
        name=name + name_suffix,
    )


@pytest.mark.slow
def test_fastcgi_finish_request(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    with example(tmp_path, "php_finish_request") as (_proc, sock):
        client = Client(str(sock))
        for page, to in (("/", "grace"), ("/defer", "ada")):
            assert client.request(page).body == b"saved\n"
            assert not any(to in ln for ln in lines(notes))  # the page came first
            wait_for(lambda to=to: any(f"mail sent to {to}@" in ln for ln in lines(notes)))
        client.close()


@pytest.mark.slow
def test_fsockopen_fire_and_forget(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    with http_server(delay=0.5) as hooks:
        with example(tmp_path, "php_fsockopen", HOOK_URL=url(hooks, "/hook")) as (_proc, sock):
            client = Client(str(sock))
            assert client.request("/").body == b"ordered\n"
            assert not lines(notes)  # answered before the hook was
            wait_for(lambda: lines(notes), what="the hook's answer")
            client.close()
        assert lines(notes)[0].startswith("hook answered 200")
        assert hooks.posted == [{"order": 42}]
        broken = url(hooks, "/broken")
        with example(tmp_path, "php_fsockopen", "-b", HOOK_URL=broken) as (_proc, sock):
            client = Client(str(sock))
            assert client.request("/").status == 200
            client.close()
            log = tmp_path / "php_fsockopen-b.log"
            wait_for(lambda: "HTTP Error 500" in log.read_text(), what="the logged failure")
        assert re.search(r"deferred notify\(.*\) failed \(request GET /\)", log.read_text())


def test_curl_multi_fans_out_at_once(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    with http_server(delay=0.2) as items:
        env = {"FAN_OUT_URL": url(items, "/item")}
        with example(tmp_path, "php_curl_multi", **env) as (_proc, sock):
            client = Client(str(sock))
            assert client.request("/?n=20").status == 200
            client.close()
            wait_for(lambda: lines(notes), what="the fan-out")
    found = re.match(r"fetched 20 in ([\d.]+) s", lines(notes)[0])
    assert found, lines(notes)
    assert 0.2 <= float(found[1]) < 2.0  # one after the other: 4 s


def test_redis_list_and_cron_is_the_journal(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    env = {"DEFERRED_JOURNAL": str(tmp_path / "journal.sqlite3")}
    with example(tmp_path, "php_redis_cron", **env) as (first, sock):
        client = Client(str(sock))
        assert client.request("/?name=cat.jpg").body == b"uploaded\n"
        client.close()
        first.kill()  # mid-thumbnail: kill -9
        first.wait()
    assert not lines(notes)
    with example(tmp_path, "php_redis_cron", "-b", **env) as (second, _sock):
        wait_for(lambda: lines(notes), what="the thumbnail, made by the next worker")
    assert lines(notes) == [f"thumbnail cat.jpg {second.pid}"]


@pytest.mark.e2e
def test_gearman_swoole_kafka_is_celery(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    with (
        redis(tmp_path) as broker,
        celery_worker(tmp_path, broker, EXAMPLE_LOG=str(notes)) as celery_pid,
    ):
        env = {"DEFERRED_CELERY": broker, "EXAMPLE_LOG": str(notes)}
        with worker(tmp_path, "examples.php_gearman:application", env=python_env(**env)) as (
            _proc,
            sock,
        ):
            client = Client(str(sock))
            assert client.request("/?name=clip.mp4").body == b"queued\n"
            client.close()
            wait_for(lambda: lines(notes), 20, "the Celery worker's run")
    assert lines(notes) == [f"transcoded clip.mp4 at 720 {celery_pid}"]


def test_nohup_and_exec_in_the_background_are_reaped_logged_and_timed_out(
    tmp_path: Path,
) -> None:
    log = tmp_path / "php_nohup.log"
    with example(tmp_path, "php_nohup") as (proc, sock):
        client = Client(str(sock))
        assert client.request("/").body == b"report started\n"
        assert client.request("/hang").body == b"report started\n"
        client.close()
        wait_for(lambda: "timeout" in log.read_text() and "exited 3" in log.read_text())
        assert zombies_of(proc.pid) == 0
    text = log.read_text()
    assert re.search(
        rf"command \['sh', '-c', .*\] exited 3 after [\d.]+ s \(request {proc.pid}-1\); "
        r"output ends:\nbuilding report\n3 pages\nwarning: no logo",
        text,
    )
    assert re.search(
        rf"command \['sleep', '60'\] killed after 0.5 s timeout after [\d.]+ s "
        rf"\(request {proc.pid}-2\); no output",
        text,
    )


def test_pcntl_fork_is_a_spawned_process_pool(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    with example(tmp_path, "php_pcntl_fork") as (proc, sock):
        client = Client(str(sock))
        assert client.request("/?n=100000").body == b"crunching\n"
        client.close()
        wait_for(lambda: lines(notes), 20, "the crunch")
        assert zombies_of(proc.pid) == 0
    found = re.match(r"crunched 100000 = (\d+) in process (\d+) (\d+)", lines(notes)[0])
    assert found and int(found[1]) == sum(i * i for i in range(100000))
    assert found[2] != found[3] == str(proc.pid)  # computed in another process


def test_generator_coroutines_are_async_def(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    with example(tmp_path, "php_generators") as (_proc, sock):
        client = Client(str(sock))
        started = time.monotonic()
        for i in range(100):
            assert client.request(f"/?job{i}").status == 200
        wait_for(lambda: len(lines(notes)) == 100, 20, "100 jobs")
        elapsed = time.monotonic() - started
        client.close()
    assert {ln.split(" on thread ")[1].split()[0] for ln in lines(notes)} == {"deferred-loop"}
    assert elapsed < 10  # 100 jobs of 0.3 s, one after the other: 30 s
