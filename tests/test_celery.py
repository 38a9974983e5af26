"""DEFERRED_CELERY: the same defer() calls run by a real Celery worker, through a real Redis."""

from __future__ import annotations

import collections
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fcgi_client import Client
from tests.gate import Gate
from tests.procs import (
    ROOT,
    connectable,
    free_port,
    lines,
    python_env,
    require,
    running,
    wait_for,
    worker,
)
from wsgi_app.journal import Journal


@contextlib.contextmanager
def redis(tmp: Path, port: int = 0) -> Iterator[str]:
    """redis-server on ``port`` (or a free one), persisting nothing; yields its URL."""
    port = port or free_port()
    cmd = [
        require("redis-server", "redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp),
    ]
    with running(cmd, tmp / "redis.log", lambda: connectable(("127.0.0.1", port)), "redis"):
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def celery_worker(tmp: Path, broker: str, **env: str) -> Iterator[int]:
    """``celery -A wsgi_app.celery worker`` (one process: its pid runs every call)."""
    log = tmp / "celery.log"
    cmd = [sys.executable, "-m", "celery", "-A", "wsgi_app.celery", "worker", "--pool", "solo"]
    cmd += ["--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with running(
        cmd,
        log,
        lambda: log.exists() and " ready." in log.read_text(),
        "the Celery worker",
        cwd=ROOT,
        env=python_env(DEFERRED_CELERY=broker, **env),
    ) as proc:
        yield proc.pid


@pytest.mark.e2e
def test_deferred_calls_run_in_a_celery_worker_in_request_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with redis(tmp_path) as broker, celery_worker(tmp_path, broker) as celery_pid:
        env = python_env(DEFERRED_CELERY=broker)
        with worker(tmp_path, "tests.apps_journal:application", env=env) as (_app, sock):
            client = Client(str(sock))
            with Gate(tmp_path / "gate") as gate:
                for r in range(10):
                    page = f"/defer?out={out}&n=3&gate={gate.path}&tag=r{r}"
                    assert client.request(page).status == 200
                assert client.request(f"/async?out={out}&tag=coroutine").status == 200
                assert client.request(f"/poison?out={out}").status == 200
                assert client.request(f"/lambda?out={out}").status == 500  # refused at defer()
                # every page answered while Celery held the first call at the gate
                assert lines(out) == []
            client.close()
            wait_for(lambda: len(lines(out)) == 32, 30, "every call run by Celery")
    runs = [ln.split() for ln in lines(out)]
    assert {pid for _, pid in runs} == {str(celery_pid)}  # none ran in the fcgi worker
    tags = collections.Counter(tag for tag, _ in runs)
    assert all(n == 1 for n in tags.values())
    for r in range(10):
        mine = [tag for tag, _ in runs if tag.startswith(f"r{r}-")]
        assert mine == [f"r{r}-0", f"r{r}-1", f"r{r}-2"]
    assert "coroutine" in tags
    celery_log = (tmp_path / "celery.log").read_text()
    assert "deferred tests.apps_journal:poisoned failed (request GET /poison" in celery_log
    assert "RuntimeError: poisoned call" in celery_log
    assert "is a lambda" in (tmp_path / "app.log").read_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_with_a_journal_calls_not_yet_published_survive_a_kill_and_are_published_once(
    tmp_path: Path,
) -> None:
    """The journal is Celery's outbox: the broker is down, so the calls wait in the
    worker's publisher; SIGKILL; with the broker back, the next worker on the journal
    publishes them, and Celery runs each once."""
    out, path = tmp_path / "out", tmp_path / "j.sqlite3"
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = python_env(DEFERRED_CELERY=broker, DEFERRED_JOURNAL=str(path))
    app = "tests.apps_journal:application"
    with worker(tmp_path, app, env=env) as (first, sock):
        client = Client(str(sock))
        for r in range(5):
            assert client.request(f"/defer?out={out}&n=2&tag=r{r}").status == 200
        client.close()
        log = tmp_path / "app.log"
        wait_for(lambda: "handing 10 call(s) to Celery" in log.read_text(), what="a failed publish")
        first.kill()
        first.wait()
    with (
        redis(tmp_path, port),
        celery_worker(tmp_path, broker) as celery_pid,
        worker(tmp_path, app, env=env, name="next"),
        contextlib.closing(Journal(path, app=None)) as journal,
    ):
        wait_for(lambda: len(lines(out)) == 10, 30, "every call run by Celery")
        wait_for(lambda: journal.counts()["journal_pending"] == 0, what="all sent")
    runs = collections.Counter(line.split()[0] for line in lines(out))
    assert runs == {f"r{r}-{i}": 1 for r in range(5) for i in range(2)}
    assert {line.split()[1] for line in lines(out)} == {str(celery_pid)}


@pytest.mark.e2e
@pytest.mark.slow
def test_calls_run_by_celery_join_the_requests_trace_directly_and_through_the_outbox(
    tmp_path: Path,
) -> None:
    """OpenTelemetry in the web workers and in the Celery worker (each writes its spans to
    one file): a call handed to Celery directly, and one recorded in the journal first
    (the outbox), runs in a span under its request's span; context variables stay behind."""
    spans_file = tmp_path / "spans.jsonl"
    app = "tests.apps_tracing:application"
    views = {}
    with (
        redis(tmp_path) as broker,
        # the Celery worker imports tests.apps_tracing (its SDK and exporter) with the calls
        celery_worker(tmp_path, broker, TEST_SPANS=str(spans_file)) as celery_pid,
    ):
        for name, journal in (
            ("direct", {}),
            ("outbox", {"DEFERRED_JOURNAL": str(tmp_path / "j")}),
        ):
            env = python_env(DEFERRED_CELERY=broker, TEST_SPANS=str(spans_file), **journal)
            with worker(tmp_path, app, env=env, name=name) as (_, sock):
                client = Client(str(sock))
                views[name] = json.loads(client.request(f"/signup?tag={name}").body)
                client.close()

        def ended() -> list[dict]:
            spans = [json.loads(line) for line in lines(spans_file)]
            ours = [s for s in spans if s["pid"] == celery_pid]
            return sum(s["name"].startswith("deferred ") for s in ours) == 4 and ours

        spans = wait_for(ended, 30, "the four calls' spans in the Celery worker")
    for name, view in views.items():
        trace = {s["name"]: s for s in spans if s["trace_id"] == view["trace_id"]}
        assert sorted(trace) == ["deferred charge", "deferred send_welcome", "smtp send"], name
        welcome, charge = trace["deferred send_welcome"], trace["deferred charge"]
        assert welcome["parent_id"] == charge["parent_id"] == view["span_id"]
        assert charge["attributes"]["deferred.request_id"] == view["request_id"]
        assert trace["smtp send"]["parent_id"] == welcome["span_id"]
        assert (welcome["status"], welcome["attributes"]["deferred.outcome"]) == ("UNSET", "done")
        assert (charge["status"], charge["attributes"]["deferred.outcome"]) == ("ERROR", "failed")
        assert charge["description"] == "RuntimeError: card declined for 1999 cents"
        assert welcome["attributes"]["shop.tag"] == "<none>"  # documented: it stays behind
