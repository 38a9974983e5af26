"""What operators use: status page, ping, access log and its rotation, socket security."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests import apps
from tests.fcgi_client import Client, request_bytes
from tests.procs import (
    HTTP,
    ROOT,
    fcgi_command,
    free_port,
    nginx,
    python_env,
    require,
    run_fcgi,
    running,
    stack,
    stop,
    wait_for,
    worker,
)

PHP_FPM_FIELDS = [
    "pool",
    "process manager",
    "start time",
    "start since",
    "accepted conn",
    "listen queue",
    "max listen queue",
    "listen queue len",
    "idle processes",
    "active processes",
    "total processes",
    "max active processes",
    "max children reached",
    "slow requests",
]
PHP_FPM_PROCESS_FIELDS = [
    "pid",
    "state",
    "start time",
    "start since",
    "requests",
    "request duration",
    "request method",
    "request uri",
    "content length",
    "user",
    "script",
    "last request cpu",
    "last request memory",
]


def test_status_page_formats(serve):
    running = serve(apps.one_deferred, status_path="/fcgi-status", pool_name="www")
    client = running.client()
    sent = 0

    def get(path: str):
        nonlocal sent
        sent += 1
        return client.request(path)

    for _ in range(3):
        assert get("/work?0.01").status == 200
    wait_for(
        lambda: json.loads(get("/fcgi-status?json").body)["deferred done"] == 3,
        what="the deferred counters to reach the status page",
    )
    data = json.loads(get("/fcgi-status?json&full").body)
    assert list(data)[: len(PHP_FPM_FIELDS)] == PHP_FPM_FIELDS
    assert data["pool"] == "www" and data["total processes"] == 1
    # requests, this one included, as PHP-FPM counts them; over one connection
    assert data["accepted conn"] == sent and data["active processes"] == 1
    assert data["deferred done"] == 3 and data["deferred failed"] == 0
    (proc,) = data["processes"]
    assert list(proc)[: len(PHP_FPM_PROCESS_FIELDS)] == PHP_FPM_PROCESS_FIELDS
    assert proc["pid"] == os.getpid() and proc["requests"] >= 3
    assert proc["request uri"] == "/fcgi-status?json&full" and proc["state"] == "Running"

    text = get("/fcgi-status").body.decode()
    assert "pool:                 www\n" in text and "deferred done:        3\n" in text

    resp = get("/fcgi-status?openmetrics")
    assert b"application/openmetrics-text" in resp.head
    families = {f.name: f for f in text_string_to_metric_families(resp.body.decode())}
    outcomes = {s.labels["outcome"]: s.value for s in families["fcgi_deferred_calls"].samples}
    assert outcomes == {"done": 3, "failed": 0, "abandoned": 0}
    assert families["fcgi_accepted_connections"].samples[0].value == sent


def test_ping_is_answered_without_the_app(serve):
    client = serve(apps.never_called, ping_path="/ping", ping_response="alive").client()
    resp = client.request("/ping")
    assert resp.status == 200 and resp.body == b"alive\n"


def test_access_log_line_at_finish_and_deferred_line_after(serve, tmp_path):
    log = tmp_path / "access.log"
    running = serve(apps.one_deferred, access_log=str(log))
    started = time.monotonic()
    resp = running.client().request("/signup?0.5", extra={"REMOTE_ADDR": "10.1.2.3"})
    assert resp.status == 200
    line = wait_for(lambda: log.exists() and log.read_text(), what="the access line")
    assert time.monotonic() - started < 0.5  # written at the finish, not after the work
    first = line.splitlines()[0]
    assert f' {os.getpid()} 10.1.2.3 "GET /signup?0.5" 200 3 ' in first
    assert " deferred=1 id=" in first
    request_id = first.rsplit("id=", 1)[1]
    wait_for(lambda: len(log.read_text().splitlines()) == 2, what="the deferred line")
    second = log.read_text().splitlines()[1]
    assert f"deferred id={request_id} count=1 ms=" in second and second.endswith("failed=0")


def test_bad_access_log_format_is_one_clear_line():
    result = run_fcgi(
        "--bind",
        "127.0.0.1:0",
        "--access-log",
        "-",
        "--access-log-format",
        "{oops",
        "tests.apps:hello",
    )
    assert result.returncode == 2
    assert "--access-log-format cannot be filled" in result.stderr


def test_rotating_the_access_log_with_sigusr1_loses_no_line(tmp_path):
    log = tmp_path / "access.log"
    with worker(tmp_path, "tests.apps:hello", "--access-log", str(log)) as (proc, sock):
        served = 0
        stop_flag = threading.Event()

        def load() -> None:
            nonlocal served
            client = Client(str(sock))
            while not stop_flag.is_set():
                assert client.request("/").status == 200
                served += 1
            client.close()

        thread = threading.Thread(target=load)
        thread.start()
        wait_for(lambda: served > 300, 20, "requests before the rotation")
        log.rename(tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: log.exists(), 10, "the reopened log")
        wait_for(lambda: served > 900, 20, "requests after the rotation")
        stop_flag.set()
        thread.join(10)
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = log.read_text().splitlines()
    assert old and new
    assert len(old) + len(new) == served


def test_tcp_allow_list_refuses_other_addresses(tmp_path):
    port = free_port()
    env = python_env(FCGI_WEB_SERVER_ADDRS="127.0.0.2")

    def connect(source: str) -> socket.socket | None:
        sock = socket.socket()
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            return None
        return sock

    cmd = fcgi_command("--bind", f"127.0.0.1:{port}", "tests.apps:hello")
    allowed: socket.socket | None = None

    def ready() -> socket.socket | None:
        nonlocal allowed
        allowed = connect("127.0.0.2")
        return allowed

    with running(cmd, tmp_path / "tcp.log", ready, "the worker's TCP port", cwd=ROOT, env=env):
        assert allowed is not None
        allowed.settimeout(5)
        allowed.sendall(request_bytes("/"))
        assert b"Hello world" in allowed.recv(4096)
        allowed.close()
        refused = connect("127.0.0.1")
        refused.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # closed without an answer
            refused.sendall(request_bytes("/"))
            assert refused.recv(4096) == b""
        refused.close()
        wait_for(
            lambda: b"127.0.0.1 refused" in (tmp_path / "tcp.log").read_bytes(),
            what="the refusal in the log",
        )


def test_public_bind_without_allow_list_warns(tmp_path):
    cmd = fcgi_command("--bind", f"0.0.0.0:{free_port()}", "tests.apps:hello")
    log = tmp_path / "public.log"
    with running(
        cmd,
        log,
        lambda: b"serving on" in log.read_bytes(),
        "the worker",
        cwd=ROOT,
        env=python_env(),
    ):
        assert b"no allow-list" in log.read_bytes()


def test_socket_group(tmp_path):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    with worker(tmp_path, "tests.apps:hello", "--socket-group", group) as (_proc, sock):
        assert sock.stat().st_gid == os.getgid()
    result = run_fcgi(
        "--bind",
        f"unix:{tmp_path}/x.sock",
        "--socket-group",
        "no-such-group-here",
        "tests.apps:hello",
    )
    assert result.returncode == 2 and "--socket-group" in result.stderr


@pytest.mark.e2e
def test_pool_status_through_nginx_reports_both_workers(tmp_path):
    with stack(tmp_path, numprocs=2) as (port, _ctl), HTTP(port) as client:
        for _ in range(20):
            assert client.get("/")[0].status == 200

        def both() -> dict:
            data = json.loads(client.get("/fcgi-status?json&full")[1])
            return data if data["total processes"] == 2 else {}

        data = wait_for(both, 10, "both workers on the status page")
        assert list(data)[: len(PHP_FPM_FIELDS)] == PHP_FPM_FIELDS
        assert {
            "deferred queued",
            "deferred running",
            "deferred done",
            "deferred failed",
            "deferred abandoned",
            "last deferred duration",
        } <= set(data)
        assert len({p["pid"] for p in data["processes"]}) == 2
        assert data["accepted conn"] >= 1
        assert client.get("/fcgi-ping")[1] == b"pong\n"
    access = (tmp_path / "var" / "log" / "access.log").read_text()
    assert access.count('"GET /" 200 ') == 20


def test_overlapping_requests_keep_the_slot_busy_from_the_oldest(tmp_path):
    """PHP-style requests overlap in one worker: the first to end must not mark the
    worker idle, nor leave a duration measured from 0 (the epoch) for the other."""
    from fcgi.ops import status
    from fcgi.ops.scoreboard import Scoreboard

    board = Scoreboard(tmp_path / "board", private=True)
    started, end = threading.Event(), threading.Event()

    def first() -> None:  # each request runs on its own thread, start to end
        board.request_started("GET", "/first", "")
        started.set()
        end.wait(30)
        board.request_ended()

    thread = threading.Thread(target=first)
    thread.start()
    started.wait(30)
    began = time.time()
    board.request_started("POST", "/second", "12")
    end.set()
    thread.join(30)
    (proc,) = status.pool_status(board, "p", full=True)["processes"]
    assert proc["state"] == "Running" and proc["request uri"] == "/second"
    assert 0 <= proc["request duration"] < 5_000_000
    board.request_ended()
    data = status.pool_status(board, "p", full=True)
    (proc,) = data["processes"]
    assert proc["state"] == "Idle" and proc["requests"] == 2
    assert 0 <= proc["request duration"] <= (time.time() - began) * 1_000_000 + 1
    assert data["accepted conn"] == 2 and data["active processes"] == 0
    board.close()


def test_workers_sharing_a_socket_share_the_status_without_a_flag(tmp_path):
    path = str(tmp_path / "pool.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    cmd = fcgi_command("--status-path", "/status", "tests.apps:hello")
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=python_env(), stdin=listener.fileno()) for _ in range(2)
    ]
    listener.close()
    try:
        client = Client(path)
        sent = 0

        def pool() -> dict:
            nonlocal sent
            sent += 1
            data = json.loads(client.request("/status?json&full").body)
            return data if data["total processes"] == 2 else {}

        data = wait_for(pool, 10, "both workers on one status page")
        assert {p["pid"] for p in data["processes"]} == {p.pid for p in procs}
        for _ in range(5):
            assert client.request("/").status == 200
        sent += 5
        data = json.loads(client.request("/status?json").body)
        assert data["accepted conn"] == sent + 1  # every request, this one too
        client.close()
    finally:
        for proc in procs:
            stop(proc)


def _chromium_page(url: str, tmp: Path) -> tuple[str, bytes]:
    """Debian's headless chromium loads ``url``: (its DOM after scripts, its screenshot)."""
    binary = require("chromium", "chromium")
    shot = tmp / "status.png"
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp / 'chromium'}",
            "--window-size=1000,800",
            "--dump-dom",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, shot.read_bytes()


class _Rows(HTMLParser):
    """The rows of each table (by id) of a DOM: lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id", "")
            self.tables[self._table] = []
        elif tag == "tr":
            self.tables[self._table].append([])
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.slow
@pytest.mark.e2e
def test_max_children_reached_counts_requests_that_found_every_worker_busy_and_html(tmp_path):
    with (
        worker(
            tmp_path, "tests.apps_multiplex:slow_or_router", "--status-path", "/fcgi-status"
        ) as (_proc, sock),
        nginx(tmp_path, sock) as port,
        HTTP(port) as client,
    ):

        def status() -> dict:
            return json.loads(client.get("/fcgi-status?json")[1])

        for _ in range(5):  # an idle pool: the status requests themselves find it free
            assert status()["max children reached"] == 0

        # Two at once on one worker with one thread: the second waits for the first.
        def slow() -> None:
            with HTTP(port) as other:
                other.get("/slow?1", "POST", b"x")

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert status()["max children reached"] == 1

        dom, png = _chromium_page(f"http://127.0.0.1:{port}/fcgi-status?html&full", tmp_path)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert '<meta http-equiv="refresh" content="5">' in dom
    rows = _Rows()
    rows.feed(dom)
    pool = dict(rows.tables["pool"])
    assert list(pool)[: len(PHP_FPM_FIELDS)] == PHP_FPM_FIELDS
    assert pool["pool"] == "app" and pool["total processes"] == "1"
    assert pool["max children reached"] == "1" and pool["accepted conn"] == "9"
    assert "deferred done" in pool and "reloads refused" in pool
    header, *procs = rows.tables["processes"]
    assert header[:3] == ["pid", "state", "start time"] and len(procs) == 1
    assert dict(zip(header, procs[0], strict=True))["request uri"] == "/fcgi-status?html&full"


def test_the_status_page_on_threads_1_answers_while_another_process_holds_the_pool_lock(
    tmp_path,
):
    """With --threads 1 the status page is served on the I/O loop's thread: it reads the
    pool's figures without their lock, so another worker holding it (stalled, or slow
    on a busy disk) never holds this worker's loop."""
    board = tmp_path / "board"
    args = ("--threads", "1", "--status-path", "/status", "--scoreboard", str(board))
    with worker(tmp_path, "tests.apps:hello", *args) as (_proc, sock):
        client = Client(str(sock))
        client.sock.settimeout(10)
        assert json.loads(client.request("/status?json").body)["total processes"] == 1
        with open(board / "pool.lock", "a") as lock, open(board / "pool.json", "a") as figures:
            for f in (lock, figures):  # another process's locks (on either): the worker's wait
                fcntl.lockf(f, fcntl.LOCK_EX)
            data = json.loads(client.request("/status?json").body)
            assert data["total processes"] == 1 and data["accepted conn"] == 2
            assert client.request("/").body == b"Hello world\n"
        client.close()


def test_a_peer_slot_replaced_under_the_same_pid_is_read_anew(tmp_path):
    """A worker reads the others' slots through maps it keeps; a slot file replaced at
    the same path (a new worker with a reused pid) must be mapped anew, not read through
    the map of the file that was removed."""
    from fcgi.ops import scoreboard
    from fcgi.ops.scoreboard import SLOT, Scoreboard

    board = Scoreboard(tmp_path / "board", private=True)
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        slot = tmp_path / "board" / f"{peer.pid}.slot"

        def write_slot(active: int) -> None:
            values = dict.fromkeys(scoreboard.NAMES, 0)
            values.update(pid=peer.pid, method=b"", uri=b"", active=active, threads=1)
            slot.unlink(missing_ok=True)
            slot.write_bytes(SLOT.pack(*values.values()))

        write_slot(active=1)
        board.read_all()
        assert board._peers_busy()
        write_slot(active=0)  # a new file where the other was
        board.read_all()
        assert not board._peers_busy()
    finally:
        peer.kill()
        peer.wait()
        board.close()


def test_the_scoreboard_refresher_has_ended_when_the_slot_is_given_up(tmp_path):
    """The refresher writes the slot and pool.json twice a second; the worker's close
    waits for it first, else it wrote into a closed map or a removed private folder."""
    from types import SimpleNamespace

    from fcgi.ops.answers import Answers

    options = SimpleNamespace(
        status_path="/status",
        ping_path="",
        ping_response="",
        mount="",
        scoreboard="",
        bind="unix:x",
        pool_name="p",
        threads=1,
    )
    listener = socket.socket(socket.AF_UNIX)
    answers = Answers(options, lambda: (0, {}), listener)
    answers.start()
    refresher = answers._refresher
    assert refresher is not None and refresher.is_alive()
    folder = answers.scoreboard.dir
    answers.close()
    listener.close()
    assert not refresher.is_alive()
    assert not folder.exists()  # private: removed with the worker


def test_reload_outcomes_recorded_from_two_threads_at_once_are_all_counted(tmp_path):
    """A reloaded interpreter records "reloaded" on its main thread while the SIGHUP
    held across its exec records "checking" on another: both wrote the same temporary
    file, and one failed (FileNotFoundError) or one count was lost."""
    from fcgi.ops.scoreboard import Scoreboard, read_reload

    board = Scoreboard(tmp_path / "board", private=True)
    errors: list[BaseException] = []

    def record(state: str) -> None:
        try:
            for _ in range(200):
                board.reload_outcome(state)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=record, args=(s,)) for s in ("checking", "reloaded")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        record_ = read_reload(tmp_path / "board", os.getpid())
        assert (record_["attempt"], record_["reloads"]) == (200, 200)
    finally:
        board.close()
