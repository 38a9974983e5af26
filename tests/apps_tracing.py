"""Traced apps for tests/test_tracing.py, served by a real worker.

OpenTelemetry's SDK with an in-memory exporter (the spans at ``/spans``) and, when
``TEST_SPANS`` names a file, one JSON line per span there too, from every process
(the helper's as well). The request's span comes from opentelemetry-instrumentation-
wsgi's middleware around ours, as an app would set it up.

``/signup?tag=T`` binds T in a context variable, defers ``send_welcome`` (which opens
a span of its own and notes the tag it sees on its span) and ``charge`` (which fails),
and answers the request id and the ids of the span current in the view; with
``&gate=PATH``, a first call waits at that gate (tests/gate.py) before them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from urllib.parse import parse_qs

from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.apps_context import request_tag
from tests.gate import wait_at
from wsgi_app.deferred import DeferredMiddleware, defer


def as_dict(span: ReadableSpan) -> dict:
    context = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
        "parent_id": trace.format_span_id(span.parent.span_id) if span.parent else None,
        "status": span.status.status_code.name,
        "description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, **dict(e.attributes or {})} for e in span.events],
        "pid": os.getpid(),
    }


class JSONLines(SpanExporter):
    """One JSON line per span, appended with one write (whole across processes)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            os.write(self.fd, (json.dumps(as_dict(span)) + "\n").encode())
        return SpanExportResult.SUCCESS


memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
if os.environ.get("TEST_SPANS"):
    provider.add_span_processor(SimpleSpanProcessor(JSONLines(os.environ["TEST_SPANS"])))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.shop")


def send_welcome(address: str) -> None:
    trace.get_current_span().set_attribute("shop.tag", request_tag.get())
    with tracer.start_as_current_span("smtp send"):  # a child of the deferred call's span
        pass


def charge(cents: int) -> None:
    raise RuntimeError(f"card declined for {cents} cents")


def _json(start_response, data: object):
    body = json.dumps(data).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _view(environ, start_response):
    if environ["PATH_INFO"] == "/spans":
        return _json(start_response, [as_dict(span) for span in memory.get_finished_spans()])
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    token = request_tag.set(query.get("tag", "<none>"))
    try:
        if "gate" in query:
            defer(environ, wait_at, query["gate"])
        defer(environ, send_welcome, "ada@example.org")
        defer(environ, charge, 1999)
    finally:
        request_tag.reset(token)
    context = trace.get_current_span().get_span_context()
    return _json(
        start_response,
        {
            "request_id": environ.get("fcgi.request_id", ""),
            "trace_id": trace.format_trace_id(context.trace_id),
            "span_id": trace.format_span_id(context.span_id),
        },
    )


application = OpenTelemetryMiddleware(DeferredMiddleware(_view))
helper = OpenTelemetryMiddleware(DeferredMiddleware(_view, process=True))  # the helper process
