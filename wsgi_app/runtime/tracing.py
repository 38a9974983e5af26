"""Deferred calls in their request's trace and logs: an OpenTelemetry span per call,
and the fields that tie a log line to its request.

A call runs in the context captured at its ``defer()`` (``Call.context``), so the
span current there (the request's, opened by the app's OpenTelemetry middleware)
is the parent of the call's span, ``deferred <callable>``. Its attributes say which
request it came from and how it ended: ``deferred.outcome`` is ``done``,
``failed`` (the exception recorded, the status an error) or ``abandoned`` (a stop's
deadline). Spans need only ``opentelemetry-api`` (``pip install
fcgi-finish[opentelemetry]``) and whatever SDK the app configures; without it the
import below is the whole cost.

Where a ``Context`` cannot go (a pickled batch to the helper process, a journal row,
a Celery message), ``traceparent()`` writes a call's place in its trace as a W3C
``traceparent`` string and ``context_from()`` reads it back; ``carried()`` and
``context_of()`` do so in the metadata a journaled or Celery-bound call travels with.
Nothing else of the request's context travels.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .calls import State

if TYPE_CHECKING:
    from .calls import Batch, Call

try:
    from opentelemetry import context as _otel
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # tracing is an optional extra: everything below is then a no-op
    _trace = None
    _W3C: Any = None
else:
    _W3C = TraceContextTextMapPropagator()

ENABLED = _trace is not None
TRACER = "wsgi_app.deferred"

log = logging.getLogger("wsgi_app.deferred")
F = TypeVar("F", bound=Callable[..., Any])
_failed: set[str] = set()  # what already logged its failure (once each, not per call)


def _guarded(func: F) -> F:
    """A tracer that raises (an SDK's span processor, an exporter) must not cost a call
    its run or its count: log it once and go on without that span."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception:
            if func.__name__ not in _failed:
                _failed.add(func.__name__)
                log.warning(
                    "tracing a deferred call failed (%s); going on", func.__name__, exc_info=True
                )
            return None

    return run  # type: ignore[return-value]


def tracer() -> Any:
    """The tracer deferred calls' spans come from (the app's global provider, looked up
    when a span starts), or None without OpenTelemetry."""
    return _trace.get_tracer(TRACER) if _trace is not None else None


@_guarded
def begin(tracer: Any, batch: Batch, call: Call) -> None:
    """Inside the call's context: open its span, a child of the span current there,
    and make it current, so spans the call opens are its children."""
    attributes = {"deferred.request": batch.origin}
    if batch.request_id:
        attributes["deferred.request_id"] = batch.request_id
    span = tracer.start_span(f"deferred {call.name}", attributes=attributes)
    call.span = span
    _otel.attach(_trace.set_span_in_context(span))  # the call's own context: no detach


@_guarded
def end(call: Call, error: BaseException | None = None, reason: str = "") -> None:
    """Close the call's span with its outcome (``call.state``); a failure or an
    abandonment is an error, with ``error`` recorded or ``reason`` as the status."""
    span = call.span
    if span is None:
        return
    span.set_attribute("deferred.outcome", call.state.value)
    if error is not None:
        span.record_exception(error)
        reason = reason or f"{type(error).__name__}: {error}"
    if call.state is not State.DONE:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, reason or call.state.value))
    span.end()


@_guarded
def abandon(tracer: Any, batch: Batch, call: Call, reason: str) -> None:
    """A stop abandoned ``call``: end its span, or (never started) open and end one in
    the current context (the call's), so the trace shows the call that never ran."""
    if call.span is None:
        if tracer is None:
            return
        begin(tracer, batch, call)
    end(call, reason=reason)


def log_fields(batch: Batch, call: Call | None = None) -> dict[str, str]:
    """``extra=`` for a log line about ``call``: ``request_id``, and with tracing on
    ``trace_id`` and ``span_id`` (the call's span, else the span it was deferred under),
    as hex the way trace backends show them."""
    fields = {"request_id": batch.request_id} if batch.request_id else {}
    if _trace is None or call is None:
        return fields
    if call.span is not None:
        span_context = call.span.get_span_context()
    elif call.context is not None:  # a copy: the call's own may be entered by its thread
        span_context = call.context.copy().run(_trace.get_current_span).get_span_context()
    else:
        return fields
    if span_context.is_valid:
        fields["trace_id"] = _trace.format_trace_id(span_context.trace_id)
        fields["span_id"] = _trace.format_span_id(span_context.span_id)
    return fields


def traceparent(context: contextvars.Context | None) -> str | None:
    """The W3C ``traceparent`` of the span current in ``context``, or None (no span,
    no OpenTelemetry)."""
    if _trace is None or context is None:
        return None
    carrier: dict[str, str] = {}
    context.copy().run(_W3C.inject, carrier)
    return carrier.get("traceparent")


def context_from(
    traceparent: str | None, base: contextvars.Context | None = None
) -> contextvars.Context | None:
    """A copy of ``base`` (else a fresh context) whose current span is the remote one
    ``traceparent`` names, so a call run in it joins that trace; None when there is
    nothing to carry."""
    if _trace is None or not traceparent:
        return None
    context = contextvars.Context() if base is None else base.copy()
    found = context.run(_W3C.extract, {"traceparent": traceparent})
    if not _trace.get_current_span(found).get_span_context().is_valid:
        return None  # malformed: the call starts a trace of its own
    context.run(_otel.attach, found)
    return context


def carried(context: contextvars.Context | None) -> dict[str, str] | None:
    """The metadata of a call that travels (``meta``, beside its arguments): the
    ``traceparent`` of the span current in its defer()'s ``context``; None without a
    span or OpenTelemetry, so such a call carries no key at all."""
    written = traceparent(context) if _trace is not None else None
    return {"traceparent": written} if written else None


def context_of(
    meta: dict[str, Any] | None, base: contextvars.Context | None = None
) -> contextvars.Context | None:
    """The context a travelled call runs in (a copy of ``base``, else a fresh one) under
    the span its metadata names (see ``carried``); None when it names none."""
    return context_from(meta.get("traceparent"), base) if meta else None


def flush(timeout: float = 5.0) -> None:
    """Export the spans still buffered (before a process ends with ``os._exit``)."""
    if _trace is None:
        return
    force_flush = getattr(_trace.get_tracer_provider(), "force_flush", None)
    if force_flush is not None:
        force_flush(int(timeout * 1000))
