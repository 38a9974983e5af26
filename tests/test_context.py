"""Deferred work runs in the context of its defer(): what the request bound in context
variables is seen by plain and coroutine calls, in memory and with the journal, and
nothing a call sets reaches the next call on its thread."""

from __future__ import annotations

import pytest

from tests import apps_context
from tests.inprocess import call_app
from tests.procs import wait_for


@pytest.fixture
def seen():
    apps_context.seen.clear()
    return apps_context.seen


def stopped(middleware) -> None:
    """The drain hooks a server calls at a stop, in their order."""
    if middleware.backend is not None:
        middleware.backend.stop()
    assert middleware.executor.drain(10) == 0
    if middleware.backend is not None:
        middleware.backend.flush()


@pytest.mark.parametrize("where", ["memory", "journal"])
def test_each_call_sees_its_own_requests_value_and_changes_only_its_copy(seen, tmp_path, where):
    settings = {"threads": 1}  # one pool thread runs every plain call, one after another
    if where == "journal":
        settings["journal"] = str(tmp_path / "journal.sqlite3")
    app = apps_context.make(**settings)
    try:
        calls = "record_and_change,record,arecord_and_change,arecord"
        call_app(app.tagged, "/", f"tag=a&calls={calls}")
        call_app(app.tagged, "/", "tag=b&calls=record,arecord")
        call_app(app.tagged, "/", "calls=record,arecord")  # a request that bound nothing
        wait_for(lambda: len(seen) == 8, what="the eight calls")
    finally:
        stopped(app)
    assert {name: tag for name, tag, _ in seen} == {
        "a/record_and_change": "a",
        "a/record": "a",  # the change before it stayed in that call's own copy
        "a/arecord_and_change": "a",
        "a/arecord": "a",
        "b/record": "b",
        "b/arecord": "b",
        "-/record": "<none>",  # not a value left on the thread by an earlier call
        "-/arecord": "<none>",
    }
    plain = {thread for name, _, thread in seen if name.endswith("/record")}
    assert len(plain) == 1  # the same thread ran the changing call and the later ones


def test_add_task_and_defer_always_carry_the_context_and_no_request_is_current(seen):
    app = apps_context.make()
    try:
        call_app(app.tagged, "/", "tag=t&how=add_task&calls=record,arecord,outside_a_request")
        call_app(app.tagged, "/", "tag=f&how=defer_always&fail=1&calls=record")  # a 500
        wait_for(lambda: len(seen) == 4, what="the four calls")
    finally:
        stopped(app)
    assert {name: tag for name, tag, _ in seen} == {
        "t/record": "t",
        "t/arecord": "t",
        # add_task() inside deferred work: after the app call, so no request is current
        "t/outside_a_request": "outside, current_environ None",
        "f/record": "f",  # defer_always: the request failed, the call ran, in its context
    }
