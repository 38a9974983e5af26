"""The journal: deferred calls that survive the worker's death, and the calls it refuses."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests import apps_journal
from tests.fcgi_client import Client
from tests.procs import ROOT, lines, python_env, stack, stop, wait_for, worker
from wsgi_app.journal import Journal
from wsgi_app.journal import log as journal_log
from wsgi_app.journal import sweeper as sweeper_module
from wsgi_app.journal import takeover as takeover_module
from wsgi_app.journal.sweeper import Sweeper
from wsgi_app.runtime.callpath import Unrecordable, dumps_args, path_of, resolve

# -- what can travel -------------------------------------------------------------------


class Holder:
    @staticmethod
    def static(x: int) -> int:
        return x

    @classmethod
    def klass(cls, x: int) -> int:
        return x


def test_module_level_functions_travel_by_import_path() -> None:
    assert path_of(apps_journal.append) == "tests.apps_journal:append"
    assert resolve("tests.apps_journal:append") is apps_journal.append
    assert resolve(path_of(Holder.static))(3) == 3
    assert resolve(path_of(Holder.klass))(4) == 4
    assert path_of(os.path.join) == "posixpath:join"


def test_lambdas_closures_bound_methods_and_odd_arguments_are_refused_by_name() -> None:
    def inner() -> None: ...

    with pytest.raises(Unrecordable, match=r"<lambda> is a lambda"):
        path_of(lambda: None)
    with pytest.raises(Unrecordable, match=r"inner is a function defined inside another"):
        path_of(inner)
    with pytest.raises(Unrecordable, match=r"Page.save is a method bound to a live Page"):
        path_of(apps_journal.Page().save)
    with pytest.raises(Unrecordable, match=r"names another object"):
        path_of(functools.wraps(apps_journal.append)(lambda *a: None))
    with pytest.raises(Unrecordable, match=r"arguments of deferred x:y cannot be recorded"):
        dumps_args("x:y", (threading.Lock(),), {})


# -- the store, across real processes ------------------------------------------------------


def journal_cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m wsgi_app.journal --journal PATH ARGS``, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "wsgi_app.journal", "--journal", str(path), *args],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
    )


def record_and_die(path: Path, *batches: list[str]) -> None:
    """Record batches of calls from another process, which is then SIGKILLed."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from wsgi_app.journal import Journal
        from wsgi_app.runtime.callpath import dumps_args
        journal = Journal({str(path)!r})
        for i, texts in enumerate({list(batches)!r}):
            journal.record(f"GET /{{i}}", [
                ("tests.apps_journal:append", dumps_args("", ("out", t), {{}}), None) for t in texts
            ])
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=python_env())
    assert proc.returncode == -signal.SIGKILL


def texts(rows) -> list[str]:
    from wsgi_app.runtime.callpath import loads_args

    return [loads_args(r.payload)[0][1] for r in rows]


def test_calls_of_a_dead_process_are_claimed_oldest_first_in_request_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    record_and_die(path, ["a1", "a2", "a3"], ["b1"], ["c1", "c2"])
    journal = Journal(path)
    groups = journal.claim()
    assert [texts(g) for g in groups] == [["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]
    assert {r.attempts for g in groups for r in g} == {0}  # none was running: no attempt used
    assert journal.claim() == []  # ours now, and we are alive
    assert journal.counts() == {"journal_pending": 6, "journal_dead": 0}
    for group in groups:
        for row in group:
            journal.done(row.id)
    wait_for(lambda: journal.counts()["journal_pending"] == 0, what="the ends recorded")
    assert journal.counts() == {"journal_pending": 0, "journal_dead": 0}
    journal.close()


def test_calls_that_end_within_a_turn_never_reach_sqlite_and_others_move(tmp_path: Path) -> None:
    with contextlib.closing(Journal(tmp_path / "j.sqlite3")) as journal:
        quick, slow = journal.record("GET /", [("m:quick", b"1", None), ("m:slow", b"2", None)])
        journal.done(quick)
        assert journal.move() == 0  # the file just started: not due yet
        assert journal.counts()["journal_pending"] == 1
        assert journal.move() == 1  # a turn later: the slow call is still pending
        assert [r.path for r in journal.rows()] == ["m:slow"]
        assert journal_log.files(journal.logs) == []
        journal.done(slow)
        wait_for(lambda: journal.rows() == [], what="the moved call's row deleted")
        assert journal.counts() == {"journal_pending": 0, "journal_dead": 0}


def test_calls_that_ended_before_a_kill_do_not_run_again(tmp_path: Path) -> None:
    """Ends are written to the log too (every DONE_DELAY): a taken-over log runs
    again only the call that had not ended."""
    path = tmp_path / "j.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, time
        from wsgi_app.journal import log as journal_log
        from wsgi_app.journal import Journal
        journal = Journal({str(path)!r})
        calls = [("m:a", b"", None), ("m:b", b"", None), ("m:c", b"", None)]
        first, second, third = journal.record("GET /", calls)
        journal.done(first)
        journal.done(third)
        [log] = journal_log.files(journal.logs)
        while not any(f[0] == "ended" for f in journal_log.read(log, warn=False)):
            time.sleep(0.001)  # the flusher writes them within DONE_DELAY
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=python_env())
    assert proc.returncode == -signal.SIGKILL
    with contextlib.closing(Journal(path)) as journal:
        assert journal.counts()["journal_pending"] == 1
        assert [[r.path for r in g] for g in journal.claim()] == [["m:b"]]


def test_a_log_cut_short_at_a_kill_gives_every_whole_frame(tmp_path: Path, caplog) -> None:
    path = tmp_path / "j.sqlite3"
    record_and_die(path, ["a1"], ["b1", "b2"])
    [log] = journal_log.files(tmp_path / "j.sqlite3.logs")
    log.write_bytes(log.read_bytes()[:-3])  # the last frame's write cut short
    with contextlib.closing(Journal(path)) as journal:
        assert [texts(g) for g in journal.claim()] == [["a1"]]
        assert f"{log.name}: " in caplog.text and "at its end cut short or damaged" in caplog.text
        assert journal_log.files(journal.logs) == []


def test_a_place_a_killed_write_left_between_whole_frames_hides_none_after_it(
    tmp_path: Path,
) -> None:
    """Appends write at once, each at its reserved place: a kill may stop one while a
    later one was written whole, leaving its start and zeros between them."""
    path = tmp_path / "j.sqlite3"
    record_and_die(path, ["a1"], ["b1"], ["c1"])
    [log] = journal_log.files(tmp_path / "j.sqlite3.logs")
    data = bytearray(log.read_bytes())
    first = journal_log.HEADER.size + journal_log.HEADER.unpack_from(data, 0)[0]
    second = journal_log.HEADER.size + journal_log.HEADER.unpack_from(data, first)[0]
    data[first + 10 : first + second] = bytes(second - 10)  # b1's write stopped 10 bytes in
    log.write_bytes(data)
    with contextlib.closing(Journal(path)) as journal:
        assert [texts(g) for g in journal.claim()] == [["a1"], ["c1"]]


def test_a_log_already_moved_is_not_read_twice_after_a_kill(tmp_path: Path) -> None:
    """A kill between the move's commit and the file's removal leaves both: the
    moved_logs mark says the rows are in SQLite already."""
    path = tmp_path / "j.sqlite3"
    script = textwrap.dedent(
        f"""
        import os
        from wsgi_app.journal import Journal
        from wsgi_app.journal import log as journal_log
        journal = Journal({str(path)!r})
        journal.record("GET /", [("m:a", b"1", None), ("m:b", b"2", None)])
        [log] = journal_log.files(journal.logs)
        kept = log.read_bytes()
        journal._unmark = lambda names: None  # killed before the file and its mark go
        assert journal.move(everything=True) == 2
        log.write_bytes(kept)
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=python_env())
    assert proc.returncode == -signal.SIGKILL
    with contextlib.closing(Journal(path)) as journal:
        assert [[r.path for r in g] for g in journal.claim()] == [["m:a", "m:b"]]
        assert journal_log.files(journal.logs) == []
        assert journal._db().execute("SELECT count(*) FROM moved_logs").fetchone() == (0,)


def test_a_live_workers_calls_are_left_alone_until_its_lease_runs_out(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    Journal(path).close()  # the schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT INTO workers VALUES ('elsewhere:1:x', 'elsewhere', 1, ?)", (time.time(),))
    db.execute(
        "INSERT INTO calls (request, origin, path, payload, owner, created)"
        " VALUES ('r', 'GET /', 'tests.apps_journal:append', x'', 'elsewhere:1:x', 0)"
    )
    journal = Journal(path)
    assert journal.claim() == []  # another host: its pid says nothing here, its lease holds
    db.execute("UPDATE workers SET heartbeat = ?", (time.time() - takeover_module.LEASE - 1,))
    assert [len(g) for g in journal.claim()] == [1]
    journal.close()
    db.close()


def test_a_failing_call_is_retried_then_kept_as_dead_for_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path, attempts=3, retry=0)
    [key] = journal.record("GET /poison", [("tests.apps_journal:poisoned", b"x", None)])
    call_id = key  # only in the log until it fails: then a row, claimed by its id
    for failures in (1, 2):  # attempts count failures
        assert journal.failed(call_id, "RuntimeError: poisoned call") == 0
        [[row]] = journal.claim()
        assert row.attempts == failures
        call_id = row.id
    assert journal.failed(call_id, "RuntimeError: poisoned call") is None
    assert journal.claim() == []
    assert journal.counts() == {"journal_pending": 0, "journal_dead": 1}

    def cli(*args: str) -> str:
        done = journal_cli(path, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = cli("list")
    assert f"{call_id}\tdead\t3 attempt(s)" in listed
    assert "GET /poison\ttests.apps_journal:poisoned\tRuntimeError: poisoned call" in listed
    assert cli("retry", str(call_id)) == "1 call(s) will run again\n"
    [[row]] = journal.claim()
    assert row.id == call_id and row.attempts == 0
    journal.failed(call_id, "again")
    assert journal.counts()["journal_dead"] == 0  # a fresh set of attempts
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE calls SET state = 'dead'")
    db.close()
    assert cli("purge", "--all-dead") == "1 call(s) purged\n"
    assert cli("list", "--all") == ""
    journal.close()


# -- the worker with a journal -------------------------------------------------------------


def counts(path: Path) -> dict[str, int]:
    """Every app's calls in the journal at ``path``."""
    with contextlib.closing(Journal(path, app=None)) as journal:
        return journal.counts()


def journal_env(path: Path, **extra: str) -> dict[str, str]:
    return python_env(DEFERRED_JOURNAL=str(path), **extra)


def test_unrecordable_calls_are_refused_at_defer_with_an_error_naming_them(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    env = journal_env(tmp_path / "j.sqlite3")
    with worker(tmp_path, "tests.apps_journal:application", env=env) as (_proc, sock):
        client = Client(str(sock))
        for page in ("/lambda", "/method", "/socket"):
            assert client.request(f"{page}?out={out}").status == 500
        assert client.request(f"/volatile?out={out}").status == 200
        wait_for(lambda: lines(out) == [f"volatile {_proc.pid}"], what="the volatile call")
        client.close()
    log = (tmp_path / "app.log").read_text()
    assert "tests.apps_journal.app.<locals>.<lambda> is a lambda" in log
    assert "Page.save is a method bound to a live Page object" in log
    assert "arguments of deferred tests.apps_journal:append cannot be recorded" in log


@pytest.mark.slow
def test_a_poisoned_call_ends_dead_after_its_attempts(tmp_path: Path) -> None:
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    env = journal_env(path, DEFERRED_ATTEMPTS="3", DEFERRED_RETRY="0.01")
    status = ("--status-path", "/fcgi-status")
    with worker(tmp_path, "tests.apps_journal:application", *status, env=env) as (_proc, sock):
        client = Client(str(sock))
        assert client.request(f"/poison?out={out}").status == 200
        wait_for(lambda: counts(path)["journal_dead"] == 1, what="a dead call")

        def shown() -> dict:
            return json.loads(client.request("/fcgi-status?json").body)

        data = wait_for(lambda: shown()["deferred journal dead"] == 1 and shown(), what="status")
        assert data["deferred journal pending"] == 0 and data["deferred failed"] == 3
        metrics = client.request("/fcgi-status?openmetrics").body.decode()
        assert 'fcgi_deferred_journal{pool="app",state="dead"} 1' in metrics
        client.close()
    assert lines(out).count(f"attempt {_proc.pid}") == 3
    log = (tmp_path / "app.log").read_text()
    assert log.count("will be retried") == 2
    assert "dead after 3 failed attempt(s) (request GET /poison" in log


def send_batches(sock: Path, out: Path, requests: int, calls: int, seconds: float) -> None:
    """``requests`` requests answered, each with ``calls`` journaled calls pending."""
    client = Client(str(sock))
    for r in range(requests):
        resp = client.request(f"/defer?out={out}&n={calls}&s={seconds}&tag=r{r}")
        assert resp.status == 200
    client.close()


def check_all_ran(out: Path, expected: int) -> collections.Counter:
    wait_for(lambda: len({ln.split()[0] for ln in lines(out)}) == expected, 30, "every call")
    runs = collections.Counter(ln.split()[0] for ln in lines(out))
    assert len(runs) == expected
    twice = [tag for tag, n in runs.items() if n > 1]
    # only those running at the kill, or ended in the DONE_DELAY before it
    assert len(twice) <= 6, f"run twice: {twice}"
    return runs


@pytest.mark.slow
def test_sigkill_with_200_calls_pending_a_fresh_worker_runs_them_all(tmp_path: Path) -> None:
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    env = journal_env(path, DEFERRED_THREADS="2")
    with worker(tmp_path, "tests.apps_journal:application", env=env) as (first, sock):
        send_batches(sock, out, 20, 10, 0.02)
        assert counts(path)["journal_pending"] > 150
        first.kill()
        first.wait()
    before = len(lines(out))
    assert before < 50
    with worker(tmp_path, "tests.apps_journal:application", env=env, name="b") as (second, _):
        check_all_ran(out, 200)
        wait_for(lambda: counts(path)["journal_pending"] == 0, what="an empty journal")
    by_second = [ln for ln in lines(out)[before:] if ln.endswith(f" {second.pid}")]
    assert len(by_second) >= 200 - before
    # each request's calls ran in the order registered
    second_tags = [ln.split()[0] for ln in by_second]
    for r in range(20):
        mine = [int(t.split("-")[1]) for t in second_tags if t.startswith(f"r{r}-")]
        assert mine == sorted(mine)


SUPERVISORD_CONF = """
[unix_http_server]
file={tmp}/supervisor.sock
[supervisord]
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}
directory={root}
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock
[fcgi-program:app]
socket=unix://{tmp}/app.sock
command={python} -m fcgi tests.apps_journal:application
process_name=%(program_name)s_%(process_num)02d
numprocs=2
directory={root}
environment=DEFERRED_JOURNAL="{journal}",DEFERRED_THREADS="2",PYTHONPATH="{root}"
startsecs=1
autorestart=true
redirect_stderr=true
stdout_logfile={tmp}/%(program_name)s_%(process_num)02d.log
"""


@pytest.mark.e2e
def test_under_supervisord_kill_9_of_one_worker_loses_nothing(tmp_path: Path) -> None:
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        SUPERVISORD_CONF.format(tmp=tmp_path, root=ROOT, python=sys.executable, journal=path)
    )
    bindir = Path(sys.executable).parent

    def pids() -> dict[str, int]:
        status = subprocess.run(
            [str(bindir / "supervisorctl"), "-c", str(conf), "status"],
            capture_output=True,
            text=True,
        ).stdout
        return {
            ln.split()[0]: int(ln.split("pid ")[1].split(",")[0])
            for ln in status.splitlines()
            if " RUNNING " in ln
        }

    proc = subprocess.Popen(
        [str(bindir / "supervisord"), "-n", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = wait_for(lambda: len(pids()) == 2 and pids(), 30, "two workers")
        # every request on one connection: one worker takes them all
        send_batches(tmp_path / "app.sock", out, 20, 10, 0.02)
        wait_for(lambda: lines(out), what="the first call")
        victim = int(lines(out)[0].split()[1])
        assert counts(path)["journal_pending"] > 150
        os.kill(victim, signal.SIGKILL)
        check_all_ran(out, 200)
        wait_for(lambda: counts(path)["journal_pending"] == 0, what="an empty journal")
        others = {int(ln.split()[1]) for ln in lines(out)} - {victim}
        assert others, "nobody took the dead worker's calls over"
        assert victim in first.values()
    finally:
        stop(proc, timeout=60)


@pytest.mark.e2e
def test_the_shipped_stack_keeps_a_journal_under_var_lib(tmp_path: Path) -> None:
    with stack(tmp_path, numprocs=1):
        path = tmp_path / "var" / "lib" / "deferred.sqlite3"
        wait_for(path.exists, what="the journal file")
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM workers").fetchone() == (1,)


def test_a_request_with_thousands_of_calls_is_recorded_in_order(tmp_path: Path) -> None:
    with contextlib.closing(Journal(tmp_path / "j.sqlite3")) as journal:
        calls = [("tests.apps_journal:append", str(i).encode(), None) for i in range(2500)]
        keys = journal.record("GET /many", calls)
        assert len(set(keys)) == 2500
        assert journal.rows() == []  # in the worker's log until it moves them
        assert journal.move(everything=True) == 2500  # all still pending: into SQLite
        assert [r.payload for r in journal.rows()] == [str(i).encode() for i in range(2500)]
        assert journal_log.files(journal.logs) == []


@pytest.mark.slow
def test_calls_left_at_a_graceful_stops_deadline_run_in_the_next_worker(tmp_path: Path) -> None:
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    env = journal_env(path, DEFERRED_THREADS="1")
    app = "tests.apps_journal:application"
    with worker(tmp_path, app, "--graceful-timeout", "0.3", env=env) as (first, sock):
        send_batches(sock, out, 1, 10, 0.2)  # 2 s of work, 0.3 s to stop
    assert first.returncode == 3  # some deferred work abandoned
    assert "left pending for the next worker" in (tmp_path / "app.log").read_text()
    assert len(lines(out)) < 10
    with worker(tmp_path, app, env=env, name="b"):
        check_all_ran(out, 10)


@pytest.mark.slow
def test_calls_left_at_a_reloads_deadline_run_once_in_the_reloaded_worker(
    tmp_path: Path,
) -> None:
    """A reload execs in place: the same pid under a new worker id takes over the calls
    its drain left; those that had ended do not run again."""
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    env = journal_env(path, DEFERRED_THREADS="1")
    app = "tests.apps_journal:application"
    with worker(tmp_path, app, "--graceful-timeout", "0.3", env=env) as (proc, sock):
        send_batches(sock, out, 1, 10, 0.2)  # 2 s of work, 0.3 s to reload
        proc.send_signal(signal.SIGHUP)
        runs = check_all_ran(out, 10)
        wait_for(lambda: counts(path)["journal_pending"] == 0, what="an empty journal")
    assert "left pending for the next worker" in (tmp_path / "app.log").read_text()
    assert {ln.split()[1] for ln in lines(out)} == {str(proc.pid)}
    assert sum(runs.values()) <= 11, runs  # only the call running at the exec twice


def test_a_journal_of_the_first_version_is_brought_up_to_date(tmp_path: Path) -> None:
    """Its calls keep their place, their runs become failures (a claim no longer counts),
    and they belong to the app "" (no middleware's: the CLI lists them)."""
    path = tmp_path / "j.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(
            "CREATE TABLE calls (id INTEGER PRIMARY KEY, request TEXT NOT NULL, origin TEXT"
            " NOT NULL, path TEXT NOT NULL, payload BLOB NOT NULL, owner TEXT, state TEXT NOT"
            " NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 1, ready_at REAL NOT"
            " NULL DEFAULT 0, created REAL NOT NULL, error TEXT)"
        )
        db.execute(
            "INSERT INTO calls (request, origin, path, payload, created) VALUES"
            " ('r', 'GET /', 'm:a', x'', 1), ('r', 'GET /', 'm:b', x'', 1)"
        )
        db.execute("UPDATE calls SET attempts = 3 WHERE path = 'm:b'")
    with contextlib.closing(Journal(path)) as journal:
        [rows] = journal.claim()
        assert [(r.path, r.attempts, r.app, r.meta) for r in rows] == [
            ("m:a", 0, "", None),
            ("m:b", 2, "", None),
        ]
        assert journal._db().execute("PRAGMA user_version").fetchone() == (2,)


def test_gone_workers_are_forgotten_even_with_nothing_to_take(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    record_and_die(path)  # registers nothing: no call recorded
    with contextlib.closing(Journal(path)) as journal:
        db = journal._db()
        db.execute("INSERT INTO workers VALUES ('old:1:x', 'old', 1, 0)")  # lease long out
        assert journal.claim() == []
        assert [w for (w,) in db.execute("SELECT id FROM workers")] == [journal.worker]


# -- the log under attack: torn files, failing writes, races, stops ----------------------------


def failing(path: Path, statement: str, message: str) -> sqlite3.Connection:
    """Another connection to the journal, with a trigger that makes ``statement`` (such
    as ``INSERT ON moved_logs``) fail with SQLite's ``message``; ``DROP TRIGGER fault``
    ends it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(
        f"CREATE TRIGGER fault BEFORE {statement} BEGIN SELECT RAISE(ABORT, '{message}'); END"
    )
    return db


def run_and_die(script: str) -> str:
    """Run ``script`` (``path`` is the journal) in another process that SIGKILLs itself
    at its end; its output."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.stdout


def test_a_log_ending_in_zeros_is_read_up_to_them_and_takeovers_go_on(tmp_path: Path) -> None:
    """A file whose tail is zeros (a crash of the machine, a preallocated block): an
    empty frame's CRC matches, its pickle does not load; the takeover must go on."""
    path = tmp_path / "j.sqlite3"
    record_and_die(path, ["a1"], ["b1"])
    [log] = journal_log.files(tmp_path / "j.sqlite3.logs")
    with log.open("ab") as f:
        f.write(bytes(4096))
    with contextlib.closing(Journal(path)) as journal:
        assert journal.counts()["journal_pending"] == 2
        assert [texts(g) for g in journal.claim()] == [["a1"], ["b1"]]
        assert journal_log.files(journal.logs) == []


def test_a_call_failing_while_its_log_moves_survives_a_kill(tmp_path: Path) -> None:
    """failed() takes the call out of the log's pending calls, then waits to insert its
    row (another process holds SQLite's write lock); a move meanwhile must not remove
    the file that is the call's only record."""
    path = tmp_path / "j.sqlite3"
    run_and_die(
        f"""
        import os, sqlite3, threading, time
        from wsgi_app.runtime.callpath import dumps_args
        from wsgi_app.journal import Journal
        path = {str(path)!r}
        journal = Journal(path)
        call = ("tests.apps_journal:append", dumps_args("", ("out", "f1"), {{}}), None)
        [key] = journal.record("GET /", [call])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another worker's long write
        threading.Thread(target=journal.failed, args=(key, "RuntimeError: x"), daemon=True).start()
        while key in journal._unmoved:
            time.sleep(0.001)
        journal.move(everything=True)  # the sweeper's turn
        os.kill(os.getpid(), 9)
        """
    )
    with contextlib.closing(Journal(path)) as journal:
        assert [texts(g) for g in journal.claim()] == [["f1"]]


def test_a_move_failing_at_its_commit_moves_again_and_deletes_no_other_row(
    tmp_path: Path,
) -> None:
    """The rows are inserted, then the commit fails (a full disk): nothing moved, so the
    calls stay pending in the log, and their row ids (rolled back, given again to the
    next rows) are not theirs."""
    path = tmp_path / "j.sqlite3"
    with contextlib.closing(Journal(path)) as journal:
        [a] = journal.record("GET /a", [("m:a", b"1", None)])
        db = failing(path, "INSERT ON moved_logs", "database or disk is full")
        with pytest.raises(sqlite3.DatabaseError, match="disk is full"):
            journal.move(everything=True)
        db.execute("DROP TRIGGER fault")
        db.close()
        journal.record("GET /b", [("m:b", b"2", None)])
        assert journal.move(everything=True) == 2  # a again, and b
        journal.done(a)
        wait_for(lambda: [r.path for r in journal.rows()] == ["m:b"], 2, "only a's row deleted")
        assert journal_log.files(journal.logs) == []


def test_claimed_calls_are_handed_over_even_if_tidying_the_log_fails(tmp_path: Path) -> None:
    """After the claim's commit, removing the moved_logs marks fails (the database
    locked past the timeout, a disk error): the calls are ours now, and must run."""
    path = tmp_path / "j.sqlite3"
    record_and_die(path, ["a1"])
    with contextlib.closing(Journal(path)) as journal:
        db = failing(path, "DELETE ON moved_logs", "database is locked")
        assert [texts(g) for g in journal.claim()] == [["a1"]]
        db.execute("DROP TRIGGER fault")
        assert journal.claim() == []  # and the mark left behind is tidied
        assert db.execute("SELECT count(*) FROM moved_logs").fetchone() == (0,)
        db.close()


def test_a_call_ending_during_a_move_whose_tidying_fails_is_still_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    with contextlib.closing(Journal(path)) as journal:
        [a] = journal.record("GET /a", [("m:a", b"1", None)])
        db = failing(path, "DELETE ON moved_logs", "database is locked")
        db.execute("BEGIN IMMEDIATE")  # the move waits for SQLite's write lock
        mover = threading.Thread(target=journal.move, kwargs={"everything": True})
        mover.start()
        wait_for(lambda: a in journal._moving, what="the move under way")
        journal.done(a)  # ends while it moves
        db.execute("COMMIT")
        mover.join()
        wait_for(lambda: journal.rows() == [], 2, "the ended call's row deleted")
        assert journal_log.files(journal.logs) == []
        db.close()


@pytest.mark.slow
def test_calls_ended_during_a_graceful_drain_do_not_run_again_after_a_kill(
    tmp_path: Path,
) -> None:
    """SIGTERM, then SIGKILL during the drain (a supervisor's stop timeout): the calls
    that ended seconds before the kill must not run again."""
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    env = journal_env(path, DEFERRED_THREADS="1")
    app = "tests.apps_journal:application"
    with worker(tmp_path, app, "--graceful-timeout", "30", env=env) as (first, sock):
        send_batches(sock, out, 1, 10, 0.2)  # 2 s of work
        first.send_signal(signal.SIGTERM)
        wait_for(lambda: len(lines(out)) >= 6, what="six calls run in the drain")
        first.kill()
        first.wait()
    with worker(tmp_path, app, env=env, name="b"):
        runs = check_all_ran(out, 10)
    # ended 0.6 s and more before the kill
    assert [runs[f"r0-{i}"] for i in range(3)] == [1, 1, 1], runs


def test_a_write_cut_short_by_a_full_disk_is_refused_and_hides_no_later_call(
    tmp_path: Path,
) -> None:
    """A write cut short (ENOSPC, the file size limit) must not be taken for a recorded
    request, nor leave a torn frame that hides the frames written after it."""
    path = tmp_path / "j.sqlite3"
    said = run_and_die(
        f"""
        import os, resource, signal
        from wsgi_app.runtime.callpath import dumps_args
        from wsgi_app.journal import Journal
        from wsgi_app.journal import log as journal_log
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        journal = Journal({str(path)!r})
        def calls(text):
            return [("tests.apps_journal:append", dumps_args("", ("out", text), {{}}), None)]
        journal.record("GET /0", calls("a1"))
        [log] = journal_log.files(journal.logs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (log.stat().st_size + 20, hard))  # full
        try:
            journal.record("GET /1", calls("b" * 100))
        except OSError:
            print("refused", journal.counts()["journal_pending"])
        else:
            print("accepted")
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
        journal.record("GET /2", calls("c1"))
        os.kill(os.getpid(), 9)
        """
    )
    assert said.split() == ["refused", "1"]
    with contextlib.closing(Journal(path)) as journal:
        assert [texts(g) for g in journal.claim()] == [["a1"], ["c1"]]


class StallingDisk:
    """CallLog's write on a disk that stalls: a write from a thread in ``stalled`` waits
    until ``release`` is set, then writes (only its first ``keep`` bytes, if set)."""

    def __init__(self) -> None:
        self.real = journal_log.CallLog.write
        self.stalled: set[int] = set()
        self.waiting = threading.Event()
        self.release = threading.Event()
        self.keep: int | None = None

    def __call__(self, fd: int, frame: bytes, *where: int) -> int:
        if threading.get_ident() in self.stalled:
            self.waiting.set()
            self.release.wait()
            frame = frame if self.keep is None else frame[: self.keep]
        return self.real(fd, frame, *where)

    def append_stalled(self, log: journal_log.CallLog, frame: bytes, keys: list[int]):
        """Append from a thread whose write stalls; (the thread, what it raised)."""
        raised: list[BaseException] = []

        def run() -> None:
            self.stalled.add(threading.get_ident())
            try:
                log.append(frame, keys)
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for(self.waiting.is_set, what="the write stalled on the disk")
        return thread, raised


@pytest.fixture
def stalling_disk(monkeypatch):
    """Every CallLog's writes on a ``StallingDisk``; released at the end whatever happens."""
    disk = StallingDisk()
    monkeypatch.setattr(journal_log.CallLog, "write", disk)
    yield disk
    disk.release.set()


def frame(key: int) -> bytes:
    return journal_log.encode("r", "GET /", 0.0, "", [("m:f", b"args", None)], [key])


def appended(log: journal_log.CallLog, key: int) -> threading.Thread:
    """Append call ``key`` from another thread, which ends once it is written."""
    thread = threading.Thread(target=log.append, args=(frame(key), [key]), daemon=True)
    thread.start()
    return thread


def test_an_append_stalled_on_the_disk_holds_up_no_other_append_nor_the_turn(
    tmp_path: Path, stalling_disk
) -> None:
    """A serving thread whose write stalls (a slow disk) must not hold up the others'
    appends, nor the sweeper's turn; its file is due once its write is done."""
    disk = stalling_disk
    log = journal_log.CallLog(tmp_path / "logs", "w")
    slow, raised = disk.append_stalled(log, frame(-1), [-1])
    quick = appended(log, -2)
    wait_for(lambda: not quick.is_alive(), what="the second append, while the first stalls")
    assert log.turn() == []  # the stalled write's file is not closed under it
    disk.release.set()
    slow.join()
    [(path, keys)] = log.turn()
    assert (raised, sorted(keys)) == ([], [-2, -1])
    assert [call.key for call in journal_log.pending([path])] == [-1, -2]  # as reserved


def test_a_write_cut_short_while_a_later_one_went_on_hides_nothing_after_it(
    tmp_path: Path, stalling_disk, caplog
) -> None:
    """The stalled write ends cut short (a full disk) after a later frame was written
    beyond it: it is refused, the later frame read, the next append in a new file."""
    disk = stalling_disk
    disk.keep = 10  # its header and a little of its pickle
    log = journal_log.CallLog(tmp_path / "logs", "w")
    slow, raised = disk.append_stalled(log, frame(-1), [-1])
    quick = appended(log, -2)
    wait_for(lambda: not quick.is_alive(), what="the second append, while the first stalls")
    disk.release.set()
    slow.join()
    assert [type(exc) for exc in raised] == [OSError] and "cut short" in str(raised[0])
    log.append(frame(-3), [-3])
    due = log.turn(everything=True)
    assert [keys for _, keys in due] == [[-2], [-3]]
    assert [call.key for call in journal_log.pending([path for path, _ in due])] == [-2, -3]
    assert "at byte 0 cut short or damaged, skipped to the next whole frame" in caplog.text


def test_a_clean_exit_without_a_drain_runs_no_ended_call_again(tmp_path: Path) -> None:
    """A process that exits normally with no drain hook (under gunicorn, drain() runs the
    executors only): a call that ended must not run again, one pending must."""
    path = tmp_path / "j.sqlite3"
    script = textwrap.dedent(
        f"""
        from wsgi_app.journal import Journal
        journal = Journal({str(path)!r})
        calls = [("m:ended", b"1", None), ("m:pending", b"2", None)]
        ended, pending = journal.record("GET /", calls)
        journal.done(ended)
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=python_env(), check=True)
    with contextlib.closing(Journal(path)) as journal:
        assert [[r.path for r in g] for g in journal.claim()] == [["m:pending"]]
        assert journal_log.files(journal.logs) == []


def test_a_journal_named_through_a_symlink_shares_its_log(tmp_path: Path) -> None:
    """SQLite follows the symlink to the one database; the log files must be found by
    every worker of that database too, whatever name it was given."""
    real, link = tmp_path / "real.sqlite3", tmp_path / "link.sqlite3"
    Journal(real).close()
    link.symlink_to(real)
    record_and_die(link, ["a1"])
    with contextlib.closing(Journal(real)) as journal:
        assert journal.counts()["journal_pending"] == 1
        assert [texts(g) for g in journal.claim()] == [["a1"]]


def test_counts_see_the_log_of_another_middleware_in_the_same_process(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with contextlib.closing(Journal(path)) as one, contextlib.closing(Journal(path)) as two:
        [key] = one.record("GET /one", [("m:one", b"1", None)])
        one.done(key)
        two.record("GET /two", [("m:two", b"2", None)])
        assert one.worker == two.worker
        assert one.counts()["journal_pending"] == 1
        assert two.counts()["journal_pending"] == 1


def test_an_unreadable_log_file_does_not_stop_every_takeover(tmp_path: Path) -> None:
    """One file that cannot be read (here a directory; EACCES, EIO alike) must not fail
    every claim of every worker, nor the status page's counts."""
    path = tmp_path / "j.sqlite3"
    record_and_die(path, ["a1"])
    (tmp_path / "j.sqlite3.logs" / "elsewhere:1:x.1.log").mkdir()
    with contextlib.closing(Journal(path)) as journal:
        assert journal.counts()["journal_pending"] == 1
        assert [texts(g) for g in journal.claim()] == [["a1"]]


@pytest.mark.slow
def test_a_move_failing_again_and_again_does_not_stop_the_heartbeat(
    tmp_path: Path, monkeypatch
) -> None:
    """Without heartbeats other workers take this live worker for gone after LEASE."""
    monkeypatch.setattr(sweeper_module, "HEARTBEAT", 0.05)
    path = tmp_path / "j.sqlite3"
    with contextlib.closing(Journal(path)) as journal:
        journal.record("GET /", [("m:a", b"1", None)])
        db = failing(path, "INSERT ON moved_logs", "database or disk is full")
        sweeper = Sweeper(journal, lambda rows: None)
        start = time.time()
        sweeper.start()
        try:

            def beat() -> float:
                return db.execute("SELECT heartbeat FROM workers").fetchone()[0]

            wait_for(lambda: beat() > start + 1.0, 5, "heartbeats while moves fail")
        finally:
            sweeper.close()
            db.execute("DROP TRIGGER fault")
            db.close()


def test_a_memory_middleware_inside_a_journaled_one_runs_its_calls(tmp_path: Path) -> None:
    """The inner middleware has no backend: its batch is its own, in memory."""
    from wsgi_app.deferred import DeferredMiddleware, defer

    out = tmp_path / "out"

    def app(environ, start_response):
        defer(environ, apps_journal.append, str(out), "inner")
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"ok\n"  # a streamed body: the outer's close() closes the inner's

    outer = DeferredMiddleware(DeferredMiddleware(app), journal=tmp_path / "j.sqlite3")
    result = outer({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None)
    assert b"".join(result) == b"ok\n"
    result.close()
    wait_for(lambda: lines(out) == [f"inner {os.getpid()}"], what="the inner call")
    outer.backend.flush()
    outer.backend.sweeper.close()


def test_a_relative_journal_path_stays_the_same_file_after_the_app_changes_folder(
    tmp_path: Path, monkeypatch
) -> None:
    """Each thread opens its own SQLite connection: with a relative DEFERRED_JOURNAL, a
    thread that opened it after the app's os.chdir() opened another (empty) file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    with contextlib.closing(Journal("j.sqlite3")) as journal:
        journal.record("GET /", [("m:call", b"1", None)])
        journal.move(everything=True)
        os.chdir(elsewhere)
        seen: list = []
        thread = threading.Thread(target=lambda: seen.append([r.path for r in journal.rows()]))
        thread.start()
        thread.join(10)
        assert seen == [["m:call"]]
    assert list(elsewhere.iterdir()) == []


def test_workers_that_make_a_new_journal_at_once_all_start(tmp_path: Path) -> None:
    """A new file takes WAL mode under an exclusive lock, and SQLite answers a worker
    that loses that race "database is locked" at once: one worker of a fresh two-worker
    stack exited at start (CI). Here another connection holds the write lock of the
    new file for half a second, as the winner does; the journal waits for it."""
    path = tmp_path / "j.sqlite3"
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    winner = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    winner.execute("BEGIN IMMEDIATE")
    done = threading.Timer(0.5, lambda: winner.execute("COMMIT"))
    done.start()
    try:
        with contextlib.closing(Journal(path, app="one")) as journal:
            assert journal.counts() == {"journal_pending": 0, "journal_dead": 0}
    finally:
        done.join()
        winner.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
