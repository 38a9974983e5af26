"""Reload in place (SIGHUP, SIGUSR2, --max-requests): the same pid, the listening socket
and the kept-alive connections carried across exec; new code checked before; and a
real stop that closes each connection right after its response."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flup.server import fcgi_base as flup

from fcgi.io.loop import KeptConnection
from fcgi.reload import HANDOVER_ENV, Handover, take_handover
from tests import django_project
from tests.fcgi_client import Client, record, request_bytes
from tests.procs import (
    connectable,
    fcgi_command,
    python_env,
    stack,
    stop,
    wait_for,
    worker,
    worker_exits,
)

APP = """
import time
from wsgi_app.deferred import DeferredMiddleware, defer

VERSION = "{version}"


def later(path):
    time.sleep(1)
    with open(path, "a") as f:
        f.write("ran\\n")


def _app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow":
        time.sleep(1)
    if path == "/defer":
        defer(environ, later, environ["QUERY_STRING"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"v{{VERSION}} {{environ['fcgi.request_id']}}".encode()]


app = DeferredMiddleware(_app)
"""


class Worker:
    """``python -m fcgi --bind unix:... reloadable:app`` with its app module in ``tmp``."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "app.sock")
        self.log_path = tmp / "app.log"
        self.clients: list[Client] = []
        self.write_app("1")
        self.out = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            fcgi_command("--bind", f"unix:{self.sock}", *args, "reloadable:app"),
            stdout=self.out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=python_env(),  # the app module imports from the folder it runs in
        )
        # serving, not only bound: a signal sent while the app loads reloads it only later
        wait_for(lambda: "serving on" in self.log, what="the worker to serve")

    def write_app(self, version: str, broken: bool = False, extra: str = "") -> None:
        text = APP.format(version=version) + ("\n1 / 0\n" if broken else "") + extra
        (self.tmp / "reloadable.py").write_text(text)
        # A .pyc is checked by the source's mtime (in seconds) and size: both may match.
        shutil.rmtree(self.tmp / "__pycache__", ignore_errors=True)

    def client(self) -> Client:
        self.clients.append(Client(self.sock))
        return self.clients[-1]

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def signal_and_wait(self, sig: int) -> None:
        """Send ``sig`` and wait until the fresh interpreter serves."""
        before = self.log.count("serving on")
        self.proc.send_signal(sig)
        wait_for(lambda: self.log.count("serving on") > before, 20, "the reload")

    def close(self) -> int:
        for client in self.clients:
            client.close()
        code = stop(self.proc)
        self.out.close()
        return code


@pytest.fixture
def reloadable(tmp_path):
    workers: list[Worker] = []

    def start(*args: str) -> Worker:
        workers.append(Worker(tmp_path, *args))
        return workers[-1]

    yield start
    for w in workers:
        w.close()


def body(client: Client, path: str = "/") -> str:
    resp = client.request(path)
    assert resp.status == 200
    return resp.body.decode()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR2])
def test_reload_keeps_the_pid_the_socket_and_the_connections(reloadable, sig):
    worker = reloadable()
    pid = worker.proc.pid
    clients = [worker.client() for _ in range(3)]
    assert [body(c) for c in clients] == [f"v1 {pid}-{n}" for n in (1, 2, 3)]
    worker.write_app("2")
    worker.signal_and_wait(sig)
    # The same connections, new code, the same process, request ids going on.
    assert [body(c) for c in clients] == [f"v2 {pid}-{n}" for n in (4, 5, 6)]
    assert body(worker.client()) == f"v2 {pid}-7"  # the listening socket too
    assert "keeping 3 connection(s)" in worker.log
    assert worker.close() == 0
    assert not Path(worker.sock).exists()  # removed at the real exit


# Imported, the new code starts a thread that never ends on its own and a child that
# keeps the worker's output open, as schedulers and pools do: both end when told.
LINGERING = """
import subprocess, sys, threading

def _linger(path="lingering-done"):
    import os, time
    while not os.path.exists(path):
        time.sleep(0.05)

threading.Thread(target=_linger).start()  # not a daemon: it holds an interpreter's exit
_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open("lingering-pids", "a") as _f:
    _f.write(f"{_child.pid}\\n")
"""


def test_a_reload_is_not_held_by_threads_or_children_the_new_code_starts(reloadable):
    """The import check ends itself once it has its answer, and its output is a file:
    it had waited for the app's thread to end, and for its child to close the pipe,
    until the check's 60 s limit refused the reload."""
    worker = reloadable()
    worker.write_app("2", extra=LINGERING)
    try:
        worker.signal_and_wait(signal.SIGHUP)
        assert body(worker.client()).startswith("v2")
        assert "refused" not in worker.log
        # the check's own child (the first) ends with the check: it ran in a session of
        # its own, where no stop of the pool reaches; the worker's (the second) lives on
        check_child, worker_child = (worker.tmp / "lingering-pids").read_text().split()
        wait_for(lambda: _gone(int(check_child)), what="the check's child to end with it")
        assert not _gone(int(worker_child))
    finally:
        (worker.tmp / "lingering-done").touch()
        pids = worker.tmp / "lingering-pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.mark.slow
def test_reload_finishes_requests_in_flight_and_their_deferred_work(reloadable):
    worker = reloadable("--threads", "2")
    slow, deferring = worker.client(), worker.client()
    done = worker.tmp / "deferred.txt"
    slow.send(request_bytes("/slow"))
    assert body(deferring, f"/defer?{done}").startswith("v1")
    worker.write_app("2")
    worker.proc.send_signal(signal.SIGHUP)
    assert slow.read_response().body.startswith(b"v1")  # finished by the old code
    wait_for(lambda: worker.log.count("serving on") == 2, 20, "the reload")
    assert done.read_text() == "ran\n"  # the deferred work ran before the exec
    assert body(slow).startswith("v2") and body(deferring).startswith("v2")


def test_a_record_half_read_before_the_exec_completes_after_it(reloadable):
    worker = reloadable()
    client = worker.client()
    data = request_bytes("/")
    client.send(data[:5])  # part of BEGIN_REQUEST's header
    wait_for(lambda: client.unread() == 0, what="the worker to read the half record")
    worker.write_app("2")
    worker.signal_and_wait(signal.SIGHUP)
    client.send(data[5:])
    assert client.read_response().body.startswith(b"v2")


@pytest.mark.slow
def test_a_multiplexed_connection_is_parked_with_its_request_running(reloadable):
    """A request sent on a busy multiplexed connection during the drain waits for the
    new interpreter instead of holding the reload up; a late ABORT for a request that
    ended before the exec is dropped there, as the spec says, not taken as an error."""
    worker = reloadable("--threads", "2")
    client = worker.client()
    client.send(request_bytes("/slow", rid=1))
    worker.write_app("2")
    worker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloading: finishing" in worker.log, 20, "the drain")
    client.send(request_bytes("/", rid=2))
    assert client.read_response(1).body.startswith(b"v1")  # ended by the old code
    wait_for(lambda: worker.log.count("serving on") == 2, 20, "the reload")
    client.send(record(flup.FCGI_ABORT_REQUEST, 1))
    assert client.read_response(2).body.startswith(b"v2")  # read by the new interpreter
    assert body(client).startswith("v2")
    assert "keeping 1 connection(s)" in worker.log


@pytest.mark.slow
def test_signals_during_the_exec_are_held_not_fatal(reloadable):
    worker = reloadable()
    client = worker.client()
    for _ in range(6):  # some land while the process execs: SIGHUP's default would kill it
        worker.proc.send_signal(signal.SIGHUP)
        time.sleep(0.03)  # spread over the reload, so that some land during the exec
    wait_for(lambda: worker.log.count("serving on") >= 2, 20, "a reload")
    # Held signals are delivered once the new interpreter has its handlers, in any
    # number (a blocked signal is pending once): nothing to count, so a moment's grace
    # for a fatal one to land. It can only miss a failure, never invent one.
    time.sleep(0.5)
    assert worker.proc.poll() is None
    assert body(client).startswith("v1")


def test_a_reload_into_code_that_fails_to_import_keeps_the_old_code(reloadable):
    worker = reloadable()
    client = worker.client()
    assert body(client).startswith("v1")
    worker.write_app("2", broken=True)
    worker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the new code is refused" in worker.log, 20, "the import check")
    assert "ZeroDivisionError" in worker.log and "Traceback" in worker.log
    assert worker.log.count("serving on") == 1  # no exec into the broken code
    assert body(client).startswith("v1") and body(worker.client()).startswith("v1")
    worker.write_app("3")
    worker.signal_and_wait(signal.SIGHUP)
    assert body(client).startswith("v3")


def test_recycling_reloads_in_place_keeping_connections(reloadable):
    worker = reloadable("--max-requests", "3")
    client = worker.client()  # one connection throughout
    answers = []
    deadline = time.monotonic() + 20
    while worker.log.count("serving on") < 3 and time.monotonic() < deadline:
        answers.append(body(client))
    assert worker.log.count("serving on") >= 3  # two recycles, in place
    assert {a.split()[1].split("-")[0] for a in answers} == {str(worker.proc.pid)}
    assert len(set(answers)) == len(answers)  # request ids never repeat


@pytest.mark.slow
def test_stop_closes_each_connection_right_after_its_response(reloadable):
    worker = reloadable()
    busy, idle = worker.client(), worker.client()
    assert body(idle).startswith("v1")
    busy.send(request_bytes("/slow"))
    wait_for(lambda: busy.unread() == 0, what="the worker to take the request")  # 1 s long
    worker.proc.send_signal(signal.SIGTERM)
    assert idle.read_record() is None  # idle, nothing in flight: closed at once
    resp = busy.read_response()  # the running request ends with END_REQUEST...
    assert resp.status == 200 and resp.end[1] == flup.FCGI_REQUEST_COMPLETE
    assert busy.read_record() is None  # ...then its connection closes
    assert worker.proc.wait(20) == 0


def post_load(port: int, clients: int, seconds: float, during: Callable[[], None]) -> Counter:
    """``clients`` keep-alive connections POSTing 2 KB through nginx for ``seconds``,
    while ``during()`` runs; the count of each outcome (status, or the error's name)."""
    outcomes: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    payload = b"p" * 2048

    def one() -> None:
        seen: Counter = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            try:
                conn.request("POST", "/ping", body=payload)
                resp = conn.getresponse()
                resp.read()
                seen[resp.status] += 1
            except (OSError, http.client.HTTPException) as exc:
                seen[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()
        with lock:
            outcomes.update(seen)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    during()
    for t in threads:
        t.join(seconds + 60)
    return outcomes


@pytest.mark.e2e
def test_reloads_and_recycles_under_post_load_fail_no_request(tmp_path):
    """Two workers under supervisord behind nginx, 16 connections POSTing 2 KB for 12 s;
    each worker gets SIGHUP twice (supervisorctl signal, as `make reload`) and recycles
    every 1000 requests: no request fails, the pids stay, supervisord sees no exit."""
    with stack(tmp_path, numprocs=2, FCGI_MAX_REQUESTS="1000") as (port, ctl):
        pids = set(re.findall(r"pid (\d+)", ctl("status", "app:*")))
        logs = tmp_path / "var" / "log"

        def reloads() -> int:
            return sum(p.read_text().count("restarting in place") for p in logs.glob("app_*.log"))

        def during() -> None:
            for pause in (3.0, 4.0):  # under load for 3 s, then each SIGHUP
                time.sleep(pause)
                before = reloads()
                ctl("signal", "HUP", "app:*")
                wait_for(lambda b=before: reloads() >= b + 2, 20, "both workers to reload")

        outcomes = post_load(port, 16, 12.0, during)
        assert set(re.findall(r"pid (\d+)", ctl("status", "app:*"))) == pids
    total = sum(outcomes.values())
    assert outcomes[200] == total, f"{total - outcomes[200]} of {total} failed: {outcomes}"
    text = "".join(p.read_text() for p in logs.glob("app_*.log"))
    # Each SIGHUP reloads, or (landing during a recycle's check) has the code checked
    # again before that recycle's exec, or (landing as a recycle's next interpreter
    # starts) reloads once that one serves.
    assert len(re.findall(r"SIGHUP(?: while starting)?: ", text)) == 4
    # and the recycles (a SIGHUP's reload starts a life's count again, so only that some
    # came); each check that passed is an exec but the last one of each worker, which
    # the stack's stop may overtake
    assert "recycling after" in text
    checks = text.count(": reloading; importing")
    assert checks - 2 <= text.count("restarting in place") <= checks
    assert "the new code is refused" not in text
    exits = worker_exits(tmp_path / "var")
    assert not exits, exits


def test_the_hand_over_round_trips_and_a_bad_one_is_ignored(caplog):
    handover = Handover(
        3, "/run/app.sock", [KeptConnection(7, b"\x01\x01", False, [1]), KeptConnection(9)]
    )
    environ = {HANDOVER_ENV: handover.encode()}
    assert take_handover(environ) == handover
    assert HANDOVER_ENV not in environ  # a child never takes the fds for its own
    assert take_handover({HANDOVER_ENV: "{not json"}) is None
    assert "not a valid hand-over" in caplog.text


@pytest.mark.slow
def test_sigterm_during_a_reload_drain_stops_for_real(reloadable):
    worker = reloadable("--threads", "2")  # the loop drains while the request runs
    client = worker.client()
    client.send(request_bytes("/slow"))
    worker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloading: finishing" in worker.log, 20, "the drain")
    worker.proc.send_signal(signal.SIGTERM)
    assert client.read_response().status == 200  # the request in flight still ends
    assert client.read_record() is None  # then its connection closes
    assert worker.proc.wait(20) == 0
    assert "restarting in place" not in worker.log
    assert not Path(worker.sock).exists()


@contextlib.contextmanager
def logged_worker(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A worker run from ``tmp_path`` with ``args``, its output in app.log; stopped after."""
    log_path = tmp_path / "app.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            fcgi_command(*args),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=python_env(),
        )
        try:
            yield proc, log_path
        finally:
            assert stop(proc) == 0


def test_a_reload_checks_the_new_code_with_chdir_and_pythonpath(tmp_path):
    src = tmp_path / "proj" / "src"
    src.mkdir(parents=True)
    (src / "reloadable.py").write_text(APP.format(version="1"))
    sock = str(tmp_path / "app.sock")
    args = ("--bind", f"unix:{sock}", "--chdir", "proj", "--pythonpath", "src", "reloadable:app")
    with logged_worker(tmp_path, *args) as (proc, log_path):
        wait_for(lambda: connectable(sock), what="the worker's socket")
        client = Client(sock)
        assert body(client).startswith("v1")
        (src / "reloadable.py").write_text(APP.format(version="2"))
        shutil.rmtree(src / "__pycache__", ignore_errors=True)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log_path.read_text().count("serving on") == 2, 20, "the reload")
        assert "the new code is refused" not in log_path.read_text()
        assert body(client).startswith("v2")  # the same connection, the new code
        client.close()


CHDIR_APP = """
import os

VERSION = "{version}"


def app(environ, start_response):
    if environ["PATH_INFO"] == "/cd":
        os.chdir(environ["QUERY_STRING"])  # a careless app (or library) moves the process
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"v{{VERSION}}".encode()]
"""


def test_a_reload_checks_the_new_code_in_the_apps_folder_after_the_app_chdirs(tmp_path):
    """The import check ran in the process's folder of the moment: once the app had
    called os.chdir(), its module was not found there and every reload (SIGHUP,
    recycling, --request-timeout) was refused for good. It runs in the app's folder."""
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    (proj / "moving.py").write_text(CHDIR_APP.format(version="1"))
    sock = str(tmp_path / "app.sock")
    args = ("--bind", f"unix:{sock}", "--chdir", "proj", "moving:app")
    with logged_worker(tmp_path, *args) as (proc, log_path):
        wait_for(lambda: "serving on" in log_path.read_text(), what="the worker to serve")
        client = Client(sock)
        assert body(client, f"/cd?{elsewhere}") == "v1"
        (proj / "moving.py").write_text(CHDIR_APP.format(version="2"))
        shutil.rmtree(proj / "__pycache__", ignore_errors=True)
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "refused" in log_path.read_text() or "reloaded" in log_path.read_text(),
            20,
            "the reload's outcome",
        )
        assert "the new code is refused" not in log_path.read_text()
        assert body(client) == "v2"  # the same connection, the new code
        client.close()


HANGING_IMPORT = """
import os
import time

if os.path.exists("hang"):  # the reload's import check: it hangs (a database down)
    with open("check.pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
"""
HANGING_IMPORT_APP = (
    HANGING_IMPORT
    + """

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""
)


def test_broken_new_code_is_refused_when_the_app_ignores_sigchld(reloadable):
    """With SIGCHLD ignored (an app's "no zombies"), the kernel reaps the check itself and
    Python reads its exit status as 0: broken code passed the check, was exec'd, and the
    worker died. The check's verdict no longer rests on its exit status alone."""
    worker = reloadable()
    sigchld = "\nimport signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
    worker.write_app("2", extra=sigchld)
    worker.signal_and_wait(signal.SIGHUP)  # the worker now ignores SIGCHLD
    client = worker.client()
    assert body(client).startswith("v2")
    worker.write_app("3", broken=True, extra=sigchld)
    worker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the new code is refused" in worker.log, 20, "the check to refuse it")
    assert "ZeroDivisionError" in worker.log
    assert body(client).startswith("v2")  # the old code serves on, on the same connection
    assert worker.proc.poll() is None


def _gone(pid: int) -> bool:
    """The process has ended (a zombie left for an init that does not reap counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_stop_during_a_reloads_import_check_leaves_no_check_process(tmp_path):
    """The check's time limit was kept by the worker's thread: a worker stopped while
    the check hung left it running, an orphan, for as long as the import hung. The check
    ends itself once the worker that asked for it is gone."""
    (tmp_path / "hanging.py").write_text(HANGING_IMPORT_APP)
    sock = str(tmp_path / "app.sock")
    with logged_worker(tmp_path, "--bind", f"unix:{sock}", "hanging:app") as (proc, log_path):
        wait_for(lambda: "serving on" in log_path.read_text(), what="the worker to serve")
        (tmp_path / "hang").touch()
        proc.send_signal(signal.SIGHUP)
        pid_file = tmp_path / "check.pid"
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the check to hang")
        check = int(pid_file.read_text())
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            wait_for(lambda: _gone(check), what="the check process to end with the worker")
        finally:
            if not _gone(check):
                os.kill(check, signal.SIGKILL)


HANGING_CHECK_SLOW_REQUEST_APP = (
    HANGING_IMPORT
    + """

def app(environ, start_response):
    open("request-began", "w").close()
    time.sleep(1)  # holds the stop a second: the worker sees its check end meanwhile
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""
)


def test_a_stop_sent_to_the_workers_process_group_during_a_check_refuses_nothing(tmp_path):
    """supervisord stops a worker with a TERM to its process group (stopasgroup): the
    reload check in that group died of it, and the worker logged the new code as
    refused (CI: "recycling after 1056 requests: the new code is refused ... exit status
    -15"). The stop is the worker's to act on; the check ends with it."""
    (tmp_path / "hanging.py").write_text(HANGING_CHECK_SLOW_REQUEST_APP)
    sock = str(tmp_path / "app.sock")
    log_path = tmp_path / "app.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            fcgi_command("--bind", f"unix:{sock}", "hanging:app"),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=python_env(),
            process_group=0,  # its own group, as supervisord starts it
        )
    pid_file = tmp_path / "check.pid"
    try:
        wait_for(lambda: "serving on" in log_path.read_text(), what="the worker to serve")
        (tmp_path / "hang").touch()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the check to hang")
        client = Client(sock)
        client.send(request_bytes("/"))
        wait_for((tmp_path / "request-began").exists, what="the request to run")
        os.killpg(proc.pid, signal.SIGTERM)
        assert client.read_response().status == 200
        client.close()
        assert proc.wait(30) == 0
        wait_for(lambda: _gone(int(pid_file.read_text())), what="the check to end with it")
    finally:
        stop(proc)
        if pid_file.exists() and pid_file.read_text() and not _gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert "refused" not in log_path.read_text()


@pytest.mark.slow
def test_sighup_while_the_app_loads_reloads_once_serving(tmp_path):
    (tmp_path / "slowstart.py").write_text(
        "import time\ntime.sleep(1)\n" + APP.format(version="1") + "\n"
    )
    sock = str(tmp_path / "app.sock")
    with logged_worker(tmp_path, "--bind", f"unix:{sock}", "slowstart:app") as (proc, log_path):
        wait_for(lambda: connectable(sock), what="the socket, bound before the app loads")
        assert "serving on" not in log_path.read_text()
        proc.send_signal(signal.SIGHUP)  # its default action would kill the worker
        wait_for(lambda: log_path.read_text().count("serving on") == 2, 30, "the reload")
        assert "SIGHUP while starting" in log_path.read_text()
        assert proc.poll() is None


SLOW_IMPORT_APP = """
import os
import signal
import time

if os.path.exists("slow-import"):
    time.sleep(2)  # the reload's import: the alarm below fires during it


def app(environ, start_response):
    if environ["PATH_INFO"] == "/alarm":
        signal.alarm(3)  # a timer of the app's that outlives the exec of a reload
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""


@pytest.mark.slow
def test_an_alarm_due_while_a_reload_imports_the_app_does_not_kill_the_worker(tmp_path):
    """An alarm timer survives exec(): due while the new interpreter imports the app,
    before it has handlers, SIGALRM's default action would end the worker. It is held
    across the exec with the other signals and handled once the worker serves."""
    (tmp_path / "alarming.py").write_text(SLOW_IMPORT_APP)
    sock = str(tmp_path / "app.sock")
    with logged_worker(tmp_path, "--bind", f"unix:{sock}", "alarming:app") as (proc, log_path):
        wait_for(lambda: connectable(sock), what="the worker's socket")
        client = Client(sock)
        assert body(client, "/alarm") == str(proc.pid)
        client.close()
        (tmp_path / "slow-import").touch()
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: proc.poll() is not None or "SIGALRM ignored" in log_path.read_text(),
            20,
            "the alarm, handled after the reload",
        )
        assert proc.poll() is None, f"the worker ended: {proc.returncode}"
        # (the alarm is handled as the handlers go in, just before the worker serves)
        wait_for(lambda: log_path.read_text().count("serving on") == 2, what="the reload")
        client = Client(sock)
        assert body(client) == str(proc.pid)
        client.close()


SLOW_EXIT_APP = """
import atexit
import time


def _slow_exit():  # as a journal that says which calls ended, or a pool closing
    with open("exiting", "a") as f:
        f.write("exiting\\n")
    time.sleep(2)


atexit.register(_slow_exit)


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


@pytest.mark.slow
def test_a_sigterm_while_a_reload_runs_the_apps_exit_hooks_stops_the_next_interpreter(
    tmp_path,
):
    """A reload's drain is over and the old interpreter runs the app's exit hooks, just
    before the exec: a SIGTERM then was taken by another thread, queued for a signal
    thread that the exec ended, and lost: the new interpreter served on. It is kept for
    the next interpreter, which stops as it starts."""
    (tmp_path / "slowexit.py").write_text(SLOW_EXIT_APP)
    sock = str(tmp_path / "app.sock")
    marker = tmp_path / "exiting"
    with logged_worker(tmp_path, "--bind", f"unix:{sock}", "slowexit:app") as (proc, log_path):
        wait_for(lambda: "serving on" in log_path.read_text(), what="the worker to serve")
        proc.send_signal(signal.SIGHUP)
        wait_for(marker.exists, 30, "the old interpreter's exit hooks")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    text = log_path.read_text()
    assert "restarting in place" in text and text.count("serving on") == 1, text


HELD_DRAIN_APP = """
import os
import time


def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":  # holds a reload's drain until told
        open("request-began", "w").close()
        while not os.path.exists("release"):
            time.sleep(0.02)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def test_a_sighup_during_a_reloads_drain_is_answered_by_that_reload(tmp_path):
    """`fcgi-finish reload` waits for the outcome of an attempt it began; a SIGHUP that
    landed while a reload drained (or checked) began none, and the reload waited out
    its deadline with "no outcome in time" although the worker served the new code."""
    from fcgi.ops.scoreboard import read_reload

    (tmp_path / "helddrain.py").write_text(HELD_DRAIN_APP)
    board = tmp_path / "board"
    sock = str(tmp_path / "app.sock")
    args = ("--bind", f"unix:{sock}", "--threads", "2", "--status-path", "/status")
    args += ("--scoreboard", str(board))
    with logged_worker(tmp_path, *args, "helddrain:app") as (proc, log_path):
        wait_for(lambda: "serving on" in log_path.read_text(), what="the worker to serve")
        client = Client(sock)
        try:
            client.send(request_bytes("/slow"))
            wait_for((tmp_path / "request-began").exists, what="the request to run")
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reloading: finishing" in log_path.read_text(), 30, "the drain")
            before = read_reload(board, proc.pid)["attempt"]
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "already under way" in log_path.read_text(), what="the second HUP")
            # recorded before that line is logged
            assert read_reload(board, proc.pid)["attempt"] == before + 1
        finally:
            (tmp_path / "release").touch()
            assert client.read_response().status == 200
            client.close()
        wait_for(
            lambda: (r := read_reload(board, proc.pid))["state"] == "reloaded" and r,
            30,
            "the reload's outcome",
        )
        assert read_reload(board, proc.pid)["attempt"] == before + 1


MASK_APP = """
import signal

with open("masks", "a") as f:  # what the main thread blocks as the app is imported
    f.write(repr(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))) + "\\n")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def test_after_a_reload_the_app_and_what_it_starts_have_no_signal_blocked(tmp_path):
    """The signals held across a reload's exec stayed blocked until the worker served,
    in every thread started before that (the app's, the executor's) and in their
    children: commands run after the response, and the next import check, ignored TERM
    and ALRM. They are the handlers' from main's first line on."""
    (tmp_path / "masked.py").write_text(MASK_APP)
    sock = str(tmp_path / "app.sock")
    masks = tmp_path / "masks"
    with logged_worker(tmp_path, "--bind", f"unix:{sock}", "masked:app") as (proc, log_path):
        wait_for(lambda: "serving on" in log_path.read_text(), what="the worker to serve")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log_path.read_text().count("serving on") == 2, 30, "the reload")
    # the worker's first import, the reload's check (a child), the reloaded one's import
    assert masks.read_text().splitlines() == ["[]", "[]", "[]"]


@pytest.mark.slow
def test_a_broken_django_view_is_refused_with_reload_check_path(tmp_path):
    """Django imports its views at the first request, so the import check alone lets a
    broken views.py through; --reload-check-path makes the check call the app once."""
    from fcgi.ops.scoreboard import read_reload

    project, board = tmp_path / "project", tmp_path / "board"
    django_project.write(project, allowed_hosts="example.com")
    args = ("--chdir", str(project), "--status-path", "/s", "--scoreboard", str(board))
    target = "http://example.com/hello"  # Host for ALLOWED_HOSTS

    def hello(sock: Path) -> bytes:
        client = Client(str(sock))
        try:
            return client.request("/hello", extra={"HTTP_HOST": "example.com"}).body
        finally:
            client.close()

    with worker(tmp_path, "mysite.wsgi:application", *args, "--reload-check-path", target) as (
        proc,
        sock,
    ):
        assert hello(sock) == b"v1"
        django_project.views(project, "v2", broken=True)
        proc.send_signal(signal.SIGHUP)
        record = wait_for(
            lambda: (r := read_reload(board, proc.pid)) and r["state"] != "checking" and r,
            30,
            "the reload's outcome",
        )
        assert record["state"] == "refused" and record["refused"] == 1
        assert record["detail"].startswith(f"GET {target} raised")  # even its 500 page fails
        assert "ModuleNotFoundError: No module named 'no_such_module'" in record["detail"]
        assert "the new code is refused" in (tmp_path / "app.log").read_text()
        assert hello(sock) == b"v1"  # the old code keeps serving

        django_project.views(project, "v3")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (read_reload(board, proc.pid) or {}).get("state") == "reloaded",
            30,
            "the reload",
        )
        assert hello(sock) == b"v3"
        client = Client(str(sock))
        status = client.request("/s?json").body
        client.close()
        assert b'"reloads": 1, "reloads refused": 1' in status


def test_the_check_request_refuses_a_5xx_with_what_the_app_logged():
    import logging

    from fcgi.reload import try_request

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/fails":
            try:
                raise ZeroDivisionError("division by zero")
            except ZeroDivisionError:
                logging.getLogger("django.request").exception("Internal Server Error: /fails")
            start_response("500 Internal Server Error", [])
            return [b""]
        start_response("404 Not Found", [])
        return [b""]

    failure = try_request(app, "/fails")
    assert failure is not None
    assert failure.startswith("GET /fails answered 500 Internal Server Error:")
    assert "django.request: Internal Server Error: /fails" in failure
    assert "ZeroDivisionError: division by zero" in failure
    assert try_request(app, "/missing") is None  # below 500: the new code answers


@pytest.mark.slow
def test_a_refused_django_reload_with_debug_on_is_shown_readable(tmp_path):
    """With DEBUG=True Django's error page fails on the same broken import again, each
    traceback chained to the last: fcgi-finish reload shows the first one's error and
    the last traceback, at most reloads.LIMIT lines a worker (once for workers that
    refused alike), and says where the whole text is."""
    from fcgi.reload import check_app
    from fcgi_finish import reloads

    project = tmp_path / "project"
    django_project.write(project)
    settings = project / "mysite" / "settings.py"
    settings.write_text(settings.read_text().replace("DEBUG = False", "DEBUG = True"))
    django_project.views(project, "v2", broken=True)
    failure = check_app("mysite.wsgi:application", (), "/hello", folder=str(project))
    assert failure is not None and "During handling of the above exception" in failure

    log = tmp_path / "var" / "log" / "app_00.log"
    deep = "".join(f'  File "x.py", line {n}, in f\n    f()\n    ^^^\n' for n in range(200))
    chained = "\n\nDuring handling of the above exception, another exception occurred:\n\n"
    long = "GET /hello raised:\n" + chained.join(
        f"Traceback (most recent call last):\n{deep}RuntimeError: attempt {n}" for n in range(9)
    )
    outcomes = [
        reloads.Outcome("app:app_00", 11, "refused", failure, log),
        reloads.Outcome("app:app_01", 12, "refused", long, log),
        reloads.Outcome("app:app_02", 13, "refused", failure, log),
    ]
    text, ok = reloads.report(outcomes)
    assert not ok
    # the pool's workers refuse alike: a text already shown is not shown again
    text, again = text.split("app:app_02 (pid 13)")
    assert again.strip() == ": refused the new code, as app:app_00 did; the old code keeps serving"
    django, other = text.split("app:app_01 (pid 12)")
    assert len(django.splitlines()) <= reloads.LIMIT + 2 and len(other.splitlines()) <= 62
    assert "During handling" not in text and "^^^" not in text
    assert "GET /hello raised:" in django and 'views.py", line 4, in <module>' in django
    assert django.count("ModuleNotFoundError: No module named 'no_such_module'") == 2
    assert "the first ended: ModuleNotFoundError" in django
    assert re.search(rf"\(\d+ of \d+ lines cut; the whole text is in {log}\)", django), django
    assert "(the last of 9 chained tracebacks; the first ended: RuntimeError: attempt 0)" in other
    assert other.rstrip().splitlines()[-2].strip() == "RuntimeError: attempt 8"
    assert f"lines cut; the whole text is in {log})" in other
