"""Django Tasks through wsgi_app.django_tasks.AfterResponseBackend: Django 6's django.tasks
on Python 3.12+, the django-tasks backport with Django 5.2 on 3.11."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.inprocess import call as get
from tests.procs import HTTP, nginx, python_env, wait_for, worker
from wsgi_app import django_tasks
from wsgi_app.deferred import DeferredMiddleware, drain

try:
    from django.tasks import TaskResultStatus
    from django.tasks.exceptions import InvalidTask
except ImportError:
    from django_tasks import TaskResultStatus
    from django_tasks.exceptions import InvalidTaskError as InvalidTask

BACKEND = {"default": {"BACKEND": "wsgi_app.django_tasks.AfterResponseBackend"}}


@pytest.fixture(scope="module")
def app() -> Iterator[DeferredMiddleware]:
    from django.core.wsgi import get_wsgi_application
    from django.test.utils import override_settings

    import examples.django_tasks_app  # noqa: F401 - configures Django unless a test did already

    with override_settings(ROOT_URLCONF="tests.apps_django_tasks", TASKS=BACKEND):
        yield DeferredMiddleware(get_wsgi_application())
        assert drain(10) == 0
    assert not django_tasks._waiting  # every enqueued result was picked up by its run


@pytest.fixture
def tasks(app):
    from tests import apps_django_tasks

    apps_django_tasks.ran.clear()
    apps_django_tasks.results.clear()
    apps_django_tasks.release.clear()
    return apps_django_tasks


def test_enqueue_in_a_request_runs_after_the_response_and_updates_its_result(app, tasks):
    status, body, response = get(app, "/record", "names=a")
    assert status == "200 OK" and body == b"a=READY\n"
    result = tasks.results["a"]
    assert len(result.id) == 32 and result.enqueued_at is not None
    assert tasks.ran == [] and result.status == TaskResultStatus.READY
    response.close()
    wait_for(lambda: result.is_finished, what="the task after the response")
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == "recorded a"
    assert result.started_at >= result.enqueued_at and result.finished_at >= result.started_at
    assert result.attempts == 1
    [(name, thread)] = tasks.ran
    assert name == "a" and thread != "MainThread"  # ran in the deferred-work pool


def test_status_is_running_while_the_task_runs(app, tasks):
    _, _, response = get(app, "/held", "names=h")
    response.close()
    result = tasks.results["h"]
    wait_for(lambda: result.status == TaskResultStatus.RUNNING, what="the task to start")
    assert not result.is_finished
    tasks.release.set()
    wait_for(lambda: result.is_finished, what="the released task")
    assert result.status == TaskResultStatus.SUCCESSFUL and tasks.ran == [("h", "released")]


def test_one_requests_tasks_run_in_the_order_enqueued(app, tasks):
    _, body, response = get(app, "/record", "names=" + ",".join("abcdefgh"))
    assert body == b" ".join(f"{n}=READY".encode() for n in "abcdefgh") + b"\n"
    response.close()
    wait_for(lambda: len(tasks.ran) == 8, what="eight tasks")
    assert [name for name, _ in tasks.ran] == list("abcdefgh")


def test_enqueue_from_code_deep_inside_the_view(app, tasks):
    _, body, response = get(app, "/deep", "names=d")
    assert body == b"d=READY\n" and tasks.ran == []
    response.close()
    wait_for(lambda: tasks.results["d"].is_finished, what="the deep task")
    assert tasks.results["d"].return_value == "recorded d"


def test_aenqueue_in_an_async_view_also_runs_after_the_response(app, tasks):
    _, body, response = get(app, "/async", "names=av")
    assert body == b"av=READY\n" and tasks.ran == []
    response.close()
    wait_for(lambda: tasks.results["av"].is_finished, what="the task from the async view")
    assert tasks.results["av"].return_value == "recorded av"


def test_a_failing_task_is_recorded_and_logged_with_its_request(app, tasks, caplog):
    _, _, response = get(app, "/fail", "names=f")
    with caplog.at_level(logging.ERROR):
        response.close()
        result = tasks.results["f"]
        wait_for(lambda: result.is_finished, what="the failing task")
        wait_for(lambda: any("GET /fail" in r.getMessage() for r in caplog.records), what="log")
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class is ValueError and "task f broke" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value
    line = next(r for r in caplog.records if "GET /fail" in r.getMessage())
    assert line.name.startswith("wsgi_app") and "run_task" in line.getMessage()
    assert "task f broke" in caplog.text  # the traceback, with the request's line


def test_an_async_task_is_awaited_after_the_response(app, tasks):
    _, body, response = get(app, "/arecord", "names=x")
    assert body == b"x=READY\n" and tasks.ran == []
    response.close()
    wait_for(lambda: tasks.results["x"].is_finished, what="the async task")
    assert tasks.results["x"].return_value == "awaited x" and tasks.ran == [("x", "awaited")]


def test_a_task_taking_context_gets_its_own_result(app, tasks):
    _, _, response = get(app, "/with_context", "names=c")
    response.close()
    result = tasks.results["c"]
    wait_for(lambda: result.is_finished, what="the task with context")
    assert tasks.ran == [("c", result.id)] and result.return_value == result.id


def test_tasks_run_in_the_context_of_the_request_that_enqueued_them(app, tasks):
    for which, tenant in (("record_tenant", "acme"), ("arecord_tenant", "globex")):
        _, _, response = get(app, f"/{which}", f"names={which}&tenant={tenant}")
        response.close()
    get(app, "/record_tenant", "names=unbound")[2].close()  # a request that bound none
    wait_for(lambda: len(tasks.ran) == 3, what="three tasks")
    assert sorted(tasks.ran) == [
        ("arecord_tenant", "globex"),
        ("record_tenant", "acme"),
        ("unbound", "<none>"),
    ]


def test_outside_a_request_enqueue_runs_at_once_like_immediate_backend(app, tasks):
    result = tasks.record.enqueue("now")
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == "recorded now"
    assert tasks.ran == [("now", "MainThread")]
    failed = tasks.fail.enqueue("now")  # recorded, not raised, as ImmediateBackend does
    assert failed.status == TaskResultStatus.FAILED
    assert failed.errors[0].exception_class is ValueError
    assert tasks.arecord.enqueue("a").return_value == "awaited a"


def test_a_task_enqueued_by_deferred_work_runs_at_once_inside_it(app, tasks):
    _, _, response = get(app, "/enqueue_from_a_task", "names=outer")
    response.close()
    wait_for(lambda: tasks.results["outer"].is_finished, what="the outer task")
    assert [name for name, _ in tasks.ran] == ["outer-inner", "outer"]
    assert tasks.results["outer"].return_value == TaskResultStatus.SUCCESSFUL


def test_beyond_the_waiting_limit_the_oldest_result_is_no_longer_updated_but_still_runs(
    app, tasks, monkeypatch
):
    monkeypatch.setattr(django_tasks, "WAITING_LIMIT", 2)
    _, _, response = get(app, "/record", "names=o1,o2,o3")
    response.close()
    wait_for(lambda: len(tasks.ran) == 3, what="three tasks")
    assert [name for name, _ in tasks.ran] == ["o1", "o2", "o3"]
    wait_for(lambda: tasks.results["o3"].is_finished, what="the last result")
    assert tasks.results["o1"].status == TaskResultStatus.READY  # its run built its own
    assert tasks.results["o2"].status == TaskResultStatus.SUCCESSFUL


def test_what_the_backend_does_not_support_is_refused(app, tasks):
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    with pytest.raises(InvalidTask, match="run_after"):
        tasks.record.using(run_after=later)
    with pytest.raises(InvalidTask, match="priority"):
        tasks.record.using(priority=10)
    with pytest.raises(NotImplementedError):
        tasks.record.get_result("any")
    assert tasks.ran == []


def test_a_call_run_elsewhere_rebuilds_its_result(app, tasks):
    """What the journal or Celery would run in another process: only plain data travels."""
    from wsgi_app.django_tasks import run_task

    run_task("tests.apps_django_tasks.record", ["r"], {}, "x" * 32, "default")
    assert tasks.ran == [("r", "MainThread")]
    with pytest.raises(ValueError, match="task g broke"):  # the executor logs it, with the request
        run_task("tests.apps_django_tasks.fail", ["g"], {}, "y" * 32, "default")


def read_fifo(path, count: int) -> list[str]:
    """``count`` lines from the FIFO ``path``: the example's tasks block opening their
    report file for writing until a reader opens it, so they cannot end before this.
    The FIFO stays open for writing here too, so it never reads as ended between two
    tasks' lines: closed and opened again there, a line written meanwhile was lost."""
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader now: tasks go on
    keeper = os.open(path, os.O_WRONLY)
    os.set_blocking(reader, True)
    data = b""
    try:
        while data.count(b"\n") < count:
            data += os.read(reader, 65536)
    finally:
        os.close(keeper)
        os.close(reader)
    return data.decode().splitlines()


@pytest.mark.e2e
def test_six_enqueues_through_nginx_answered_at_once_tasks_run_after_in_the_worker(tmp_path):
    reports = tmp_path / "reports.fifo"
    os.mkfifo(reports)
    env = python_env(REPORT_FILE=str(reports))
    with (
        worker(tmp_path, "examples.django_tasks_app:application", env=env) as (proc, sock),
        nginx(tmp_path, sock) as port,
        HTTP(port) as client,
    ):
        asked = []
        for i in range(6):
            asked.append(time.time())
            resp, body, _ = client.get(f"/report?name=r{i}")
            # answered while no task can end (none has written its line yet): the
            # task never held the response
            assert resp.status == 200 and body.endswith(b" READY\n"), body
        runs = {}
        for line in read_fifo(reports, 6):
            name, *fields = line.split()
            runs[name] = dict(field.split("=") for field in fields)
        assert sorted(runs) == [f"r{i}" for i in range(6)]
        for i in range(6):
            run = runs[f"r{i}"]
            assert int(run["pid"]) == proc.pid != os.getpid()  # in the worker that answered
            assert float(run["started"]) >= asked[i]


@pytest.mark.e2e
def test_tasks_still_running_at_sigterm_are_finished_before_the_worker_exits(tmp_path):
    reports = tmp_path / "reports.fifo"
    os.mkfifo(reports)
    env = python_env(REPORT_FILE=str(reports))
    with (
        worker(tmp_path, "examples.django_tasks_app:application", env=env) as (proc, sock),
        nginx(tmp_path, sock) as port,
        HTTP(port) as client,
    ):
        for i in range(3):
            resp, _, _ = client.get(f"/report?name=s{i}")
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)  # no task can have ended: none wrote its line
        names = sorted(line.split()[0] for line in read_fifo(reports, 3))
        assert proc.wait(30) == 0  # a graceful stop: the three ended first
    assert names == ["s0", "s1", "s2"]
