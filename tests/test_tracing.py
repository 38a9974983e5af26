"""Deferred calls in their request's trace (OpenTelemetry): a span per call under the
request's span, its outcome and request id as attributes, the trace id on the lines
logged about it; a trace context written as a W3C traceparent and read back; no
OpenTelemetry, no cost."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import subprocess
import sys
import threading

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.apps_context import request_tag
from tests.apps_tracing import as_dict
from tests.fcgi_client import Client
from tests.gate import Gate
from tests.inprocess import call_app
from tests.procs import HTTP, ROOT, lines, nginx, python_env, wait_for, worker
from wsgi_app.deferred import DeferredMiddleware, defer
from wsgi_app.runtime import tracing
from wsgi_app.runtime.tracing import carried, context_from, context_of, traceparent


@pytest.fixture
def provider():
    """An SDK provider of the test's own (the global one is left alone), its finished
    spans in ``provider.spans()`` as dicts."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.spans = lambda: [as_dict(span) for span in exporter.get_finished_spans()]
    yield provider
    provider.shutdown()


def traced(view, provider, **settings) -> tuple[DeferredMiddleware, OpenTelemetryMiddleware]:
    """``view`` under the middleware, its spans from ``provider``, under the request span."""
    middleware = DeferredMiddleware(view, **settings)
    middleware.executor.tracer = provider.get_tracer("wsgi_app.deferred")
    return middleware, OpenTelemetryMiddleware(middleware, tracer_provider=provider)


def deferred(spans: list[dict]) -> dict[str, dict]:
    return {s["name"]: s for s in spans if s["name"].startswith("deferred ")}


def welcome(address: str) -> None:
    pass


def broken(address: str) -> None:
    raise LookupError(f"no user {address}")


async def awelcome(address: str) -> None:
    await asyncio.sleep(0)


async def abroken(address: str) -> None:
    await asyncio.sleep(0)
    raise LookupError(f"no user {address}")


async def forever() -> None:
    await asyncio.Event().wait()


def test_each_call_is_a_span_under_the_requests_with_its_outcome(serve, provider, caplog):
    def view(environ, start_response):
        for func in (welcome, broken, awelcome, abroken):
            defer(environ, func, "ada@example.org")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["fcgi.request_id"].encode()]

    middleware, app = traced(view, provider)
    with caplog.at_level(logging.ERROR, "wsgi_app.deferred"):
        request_id = serve(app).client().request("/signup").body.decode()

        def ended() -> list[dict]:  # the request's span ends after it hands its calls over
            spans = provider.spans()
            return len(deferred(spans)) == 4 and any(s["kind"] == "SERVER" for s in spans) and spans

        spans = wait_for(ended, what="the request's and the four calls' spans")
    assert middleware.executor.drain(5) == 0
    [request] = [s for s in spans if s["kind"] == "SERVER"]
    calls = deferred(spans)
    assert sorted(calls) == [
        "deferred abroken",
        "deferred awelcome",
        "deferred broken",
        "deferred welcome",
    ]
    for name, span in calls.items():
        assert (span["trace_id"], span["parent_id"]) == (request["trace_id"], request["span_id"])
        failed = "broken" in name
        assert span["attributes"] == {
            "deferred.request": "GET /signup",
            "deferred.request_id": request_id,
            "deferred.outcome": "failed" if failed else "done",
        }
        assert span["status"] == ("ERROR" if failed else "UNSET")
        if failed:
            assert span["description"] == "LookupError: no user ada@example.org"
            assert [e["exception.type"] for e in span["events"]] == ["LookupError"]
    failures = [r for r in caplog.records if " failed (request GET /signup)" in r.getMessage()]
    assert len(failures) == 2
    for record in failures:  # the line names the span of the call it is about
        name = "deferred " + record.getMessage().split()[1].partition("(")[0]
        assert (record.trace_id, record.span_id) == (request["trace_id"], calls[name]["span_id"])
        assert record.request_id == request_id


def test_a_timeout_and_a_stop_end_the_spans_as_failed_and_abandoned(serve, provider):
    release = threading.Event()

    def view(environ, start_response):
        defer(environ, forever)  # cancelled at the timeout
        defer(environ, release.wait, 10)  # still running at the stop
        defer(environ, welcome, "never")  # never started
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware, app = traced(view, provider, threads=1, timeout=0.05)
    try:
        serve(app).client().request("/stop")
        stats = middleware.stats
        wait_for(lambda: stats()["failed"] == stats()["running"] == 1, what="the timeout, the wait")
        assert middleware.executor.drain(0.1) == 2
    finally:
        release.set()
    calls = deferred(provider.spans())
    outcomes = {
        name: (s["attributes"]["deferred.outcome"], s["status"], s["description"])
        for name, s in calls.items()
    }
    assert outcomes == {
        "deferred forever": ("failed", "ERROR", "cancelled after 0.05 s"),
        "deferred Event.wait": ("abandoned", "ERROR", "abandoned at stop, still running"),
        "deferred welcome": ("abandoned", "ERROR", "abandoned at stop, never started"),
    }
    assert len({s["parent_id"] for s in calls.values()}) == 1  # all under the request's


def test_a_failed_requests_skipped_calls_are_logged_with_its_trace(serve, provider, caplog):
    def view(environ, start_response):
        defer(environ, welcome, "ada@example.org")
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [environ["fcgi.request_id"].encode()]

    _, app = traced(view, provider)
    with caplog.at_level(logging.WARNING, "wsgi_app.deferred"):
        request_id = serve(app).client().request("/signup").body.decode()
        [request] = wait_for(lambda: provider.spans(), what="the request's span")
    [skipped] = [r for r in caplog.records if "skipping its deferred" in r.getMessage()]
    assert (skipped.request_id, skipped.trace_id) == (request_id, request["trace_id"])
    assert skipped.span_id == request["span_id"]  # the span the call was deferred under


class RaisingTracer:
    """A stub tracer whose spans cannot start (a broken span processor or exporter)."""

    def start_span(self, *args, **kwargs):
        raise RuntimeError("exporter down")


def test_a_tracer_that_raises_costs_no_call_its_run(caplog, monkeypatch):
    monkeypatch.setattr(tracing, "_failed", set())  # what logged once already: nothing yet
    ran: list[str] = []

    def view(environ, start_response):
        for tag in ("first", "second"):
            defer(environ, ran.append, tag)
        start_response("200 OK", [])
        return [b"ok"]

    app = DeferredMiddleware(view)
    app.executor.tracer = RaisingTracer()
    with caplog.at_level(logging.WARNING, "wsgi_app.deferred"):
        call_app(app)
        assert app.executor.drain(5) == 0
    assert ran == ["first", "second"] and app.stats()["done"] == 2
    warned = [r for r in caplog.records if "tracing a deferred call failed" in r.getMessage()]
    assert len(warned) == 1
    assert "exporter down" in caplog.text  # logged once, with its traceback


def test_a_traceparent_carries_a_contexts_span_and_reads_back(provider):
    with provider.get_tracer("tests").start_as_current_span("GET /signup") as span:
        captured = contextvars.copy_context()
    ids = span.get_span_context()
    written = traceparent(captured)
    assert written == f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
    back = context_from(written)
    remote = back.run(trace.get_current_span).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (ids.trace_id, ids.span_id, True)
    assert traceparent(back) == written
    assert traceparent(contextvars.Context()) is None  # no span there: nothing to carry
    assert traceparent(None) is None
    assert context_from("00-not-a-traceparent-01") is None and context_from(None) is None


def test_a_travelling_calls_metadata_names_its_span_only_when_it_has_one(provider):
    """What the journal and Celery carry: the traceparent, or no key at all; read back
    into a copy of a given context (the Celery task's), whose own variables stay."""
    with provider.get_tracer("tests").start_as_current_span("GET /signup"):
        meta = carried(contextvars.copy_context())
    assert meta == {"traceparent": traceparent(context_from(meta["traceparent"]))}
    assert carried(contextvars.Context()) is None and carried(None) is None
    task = contextvars.copy_context()
    task.run(request_tag.set, "bound by the Celery worker")
    joined = context_of(meta, task)
    assert traceparent(joined) == meta["traceparent"]
    assert joined.run(request_tag.get) == "bound by the Celery worker"
    assert task.run(trace.get_current_span) is trace.INVALID_SPAN  # a copy was changed
    assert context_of(None, task) is None and context_of({}) is None


@pytest.mark.e2e
def test_one_request_through_nginx_is_one_trace_with_its_deferred_calls(tmp_path):
    env = python_env()
    with (
        worker(tmp_path, "tests.apps_tracing:application", "--log-format", "json", env=env) as (
            _proc,
            sock,
        ),
        nginx(tmp_path, sock) as port,
        HTTP(port) as client,
    ):
        resp, body, _ = client.get("/signup?tag=ada")
        assert resp.status == 200
        view = json.loads(body)

        def finished() -> list[dict]:
            spans = json.loads(client.get("/spans")[1])
            done = {s["name"] for s in spans}
            return {"deferred send_welcome", "deferred charge", "GET /signup"} <= done and spans

        spans = wait_for(finished, 30, "the request's and the deferred calls' spans")
    trace_spans = [s for s in spans if s["trace_id"] == view["trace_id"]]
    by_name = {s["name"]: s for s in trace_spans}
    assert sorted(by_name) == [
        "GET /signup",
        "deferred charge",
        "deferred send_welcome",
        "smtp send",
    ]
    request, welcome_, charge = (
        by_name["GET /signup"],
        by_name["deferred send_welcome"],
        by_name["deferred charge"],
    )
    assert request["kind"] == "SERVER" and request["span_id"] == view["span_id"]
    for span in (welcome_, charge):
        assert span["parent_id"] == request["span_id"]
        assert span["attributes"]["deferred.request_id"] == view["request_id"]
    assert by_name["smtp send"]["parent_id"] == welcome_["span_id"]  # the call's own span
    assert welcome_["attributes"]["shop.tag"] == "ada"  # the request's context variable
    assert (welcome_["status"], welcome_["attributes"]["deferred.outcome"]) == ("UNSET", "done")
    assert (charge["status"], charge["attributes"]["deferred.outcome"]) == ("ERROR", "failed")
    assert charge["description"] == "RuntimeError: card declined for 1999 cents"
    assert charge["events"][0]["exception.type"] == "RuntimeError"
    logged = [json.loads(line) for line in lines(tmp_path / "app.log") if line.startswith("{")]
    [failure] = [line for line in logged if "charge(1999) failed" in line["message"]]
    assert failure["request_id"] == view["request_id"]
    assert (failure["trace_id"], failure["span_id"]) == (view["trace_id"], charge["span_id"])
    assert "RuntimeError: card declined" in failure["exception"]


@pytest.mark.e2e
def test_in_the_helper_process_the_trace_crosses_and_context_variables_do_not(tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    env = python_env(TEST_SPANS=str(spans_file))
    with worker(tmp_path, "tests.apps_tracing:helper", env=env) as (proc, sock):
        client = Client(str(sock))
        view = json.loads(client.request("/signup?tag=ada").body)
        client.close()

        def ended() -> list[dict]:
            spans = [json.loads(line) for line in lines(spans_file)]
            return len(deferred(spans)) == 2 and spans

        spans = wait_for(ended, 30, "the helper's spans")
    calls = deferred(spans)
    for span in calls.values():
        assert span["pid"] != proc.pid  # ran in the helper
        assert (span["trace_id"], span["parent_id"]) == (view["trace_id"], view["span_id"])
        assert span["attributes"]["deferred.request_id"] == view["request_id"]
    assert calls["deferred send_welcome"]["attributes"]["shop.tag"] == "<none>"  # documented
    assert calls["deferred charge"]["status"] == "ERROR"
    text = (tmp_path / "app.log").read_text()
    [line] = [ln for ln in text.splitlines() if "charge(1999) failed" in ln]
    assert f"id={view['request_id']} trace={view['trace_id']}" in line  # the text format


@pytest.mark.e2e
@pytest.mark.slow
def test_journaled_calls_taken_over_after_a_kill_run_in_the_requests_trace(tmp_path):
    """The calls wait behind a first one held at a gate; SIGKILL; a fresh worker on the
    journal takes them over (and retries the failing one): each in a span under the
    request's, from its traceparent in the journal; context variables stay behind."""
    spans_file = tmp_path / "spans.jsonl"
    env = python_env(
        TEST_SPANS=str(spans_file),
        DEFERRED_JOURNAL=str(tmp_path / "j.sqlite3"),
        DEFERRED_ATTEMPTS="2",
        DEFERRED_RETRY="0.05",
    )
    app = "tests.apps_tracing:application"
    with Gate(tmp_path / "gate") as gate, worker(tmp_path, app, env=env) as (first, sock):
        client = Client(str(sock))
        view = json.loads(client.request(f"/signup?tag=ada&gate={gate.path}").body)
        client.close()
        first.kill()
        first.wait()
    with worker(tmp_path, app, env=env, name="next") as (second, sock):
        # a first request says the app is served here (OpenTelemetry's middleware around
        # ours does not hand on fcgi_startup): takeovers start
        client = Client(str(sock))
        assert client.request("/spans").status == 200
        client.close()

        def ended() -> list[dict]:
            spans = [json.loads(line) for line in lines(spans_file)]
            ours = [s for s in spans if s["pid"] == second.pid]
            names = [s["name"] for s in ours]
            return names.count("deferred charge") == 2 and "deferred send_welcome" in names and ours

        spans = wait_for(ended, 30, "the taken-over calls' spans, the retry's too")
    calls = [s for s in spans if s["name"].startswith("deferred ")]
    assert {s["name"] for s in calls} == {
        "deferred wait_at",
        "deferred send_welcome",
        "deferred charge",
    }
    for span in calls:
        assert (span["trace_id"], span["parent_id"]) == (view["trace_id"], view["span_id"])
        assert span["attributes"]["deferred.request_id"] == view["request_id"]
    by_name = {s["name"]: s for s in spans}
    assert by_name["smtp send"]["parent_id"] == by_name["deferred send_welcome"]["span_id"]
    assert by_name["deferred send_welcome"]["attributes"]["shop.tag"] == "<none>"  # documented
    assert [s["status"] for s in calls if s["name"] == "deferred charge"] == ["ERROR", "ERROR"]


def test_without_opentelemetry_calls_run_in_their_context_with_no_span_and_no_import():
    script = """
import contextvars, json, logging, sys
sys.modules["opentelemetry"] = None  # as if not installed: every import of it fails
from tests.inprocess import call_app
from tests.procs import wait_for
from wsgi_app.deferred import DeferredMiddleware, defer
from wsgi_app.runtime import tracing

tag = contextvars.ContextVar("tag", default="<none>")
seen, records = [], []
logging.getLogger("wsgi_app.deferred").addHandler(logging.Handler())
logging.getLogger("wsgi_app.deferred").handlers[0].emit = records.append

def broken():
    seen.append(tag.get())
    raise LookupError("broken")

def view(environ, start_response):
    tag.set("ada")
    defer(environ, broken)
    start_response("200 OK", [])
    return [b"ok"]

app = DeferredMiddleware(view)
call_app(lambda environ, start_response: app({**environ, "fcgi.request_id": "7-1"}, start_response))
wait_for(lambda: records)
print(json.dumps({
    "enabled": tracing.ENABLED,
    "tracer": repr(app.executor.tracer),
    "carried": tracing.carried(contextvars.copy_context()),
    "seen": seen,
    "fields": {k: getattr(records[0], k, None) for k in ("request_id", "trace_id")},
    "imported": sorted(m for m, v in sys.modules.items() if "opentelemetry" in m and v),
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "enabled": False,
        "tracer": "None",
        "carried": None,
        "seen": ["ada"],
        "fields": {"request_id": "7-1", "trace_id": None},
        "imported": [],
    }
