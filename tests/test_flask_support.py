"""wsgi_app.flask_support with real Flask: deferred calls inside a fresh app context."""

from __future__ import annotations

import logging

import pytest
from flask import Flask

from tests import apps_flask
from tests.inprocess import call
from tests.procs import wait_for
from wsgi_app.deferred import DeferredMiddleware, drain
from wsgi_app.flask_support import FlaskDeferred, defer_in_app


@pytest.fixture
def seen():
    apps_flask.seen.clear()
    yield apps_flask.seen
    assert drain(10) == 0


def test_the_call_runs_after_the_response_inside_a_fresh_app_context(seen):
    app = apps_flask.make_app("shop")
    status, body, response = call(app, "/in-app", "tag=t1")
    assert status == "200 OK" and body == b"queued\n"
    assert seen == []  # not before the response is done
    response.close()
    wait_for(lambda: seen, what="the deferred call")
    assert seen == [
        {
            "tag": "t1",
            "app": "shop",
            "greeting": "hello from shop",
            "g_user": None,  # a fresh g: the request's g.user is not there
            "request_path": "/in-app",
            "shopper": "ada",  # the request's context variables are
        }
    ]


def test_each_app_gets_its_own_context(seen):
    first, second = apps_flask.make_app("first"), apps_flask.make_app("second")
    for app, tag in ((first, "a"), (second, "b")):
        call(app, "/in-app", f"tag={tag}")[2].close()
    wait_for(lambda: len(seen) == 2, what="two deferred calls")
    assert sorted((s["tag"], s["app"]) for s in seen) == [("a", "first"), ("b", "second")]


def test_a_coroutine_function_is_awaited_inside_the_app_context(seen):
    app = apps_flask.make_app("async-shop")
    call(app, "/coroutine", "tag=c")[2].close()
    wait_for(lambda: seen, what="the awaited call")
    assert seen[0]["app"] == "async-shop" and seen[0]["greeting"] == "hello from async-shop"


def test_a_failing_call_is_logged_and_the_next_call_still_gets_its_context(seen, caplog):
    app = apps_flask.make_app("shop")
    with caplog.at_level(logging.ERROR):
        call(app, "/broken")[2].close()
        wait_for(lambda: len(seen) == 2, what="both calls")
        wait_for(lambda: "deferred first broke" in caplog.text, what="the failure's log")
    assert seen[0] == {"tag": "first"} and seen[1]["tag"] == "second"
    assert seen[1]["app"] == "shop"  # the failed call's context was popped, not leaked
    assert any(
        "GET /broken" in r.getMessage() and "broken(" in r.getMessage() for r in caplog.records
    )


def test_add_task_in_a_flask_view_needs_no_environ(seen):
    app = apps_flask.make_app()
    _, body, response = call(app, "/add-task", "tag=p")
    assert body == b"queued\n" and seen == []
    response.close()
    wait_for(lambda: seen, what="the added task")
    assert seen == [{"tag": "p", "plain": True}]


def test_outside_a_request_defer_in_app_refuses(seen):
    app = apps_flask.make_app()
    with pytest.raises(RuntimeError, match="inside a Flask request"):
        defer_in_app(apps_flask.plain, "no context at all")
    with app.app_context(), pytest.raises(RuntimeError, match="inside a Flask request"):
        defer_in_app(apps_flask.plain, "an app context, no request")  # e.g. a CLI command
    assert seen == []


def test_flask_deferred_wraps_wsgi_app_and_keeps_the_flask_object():
    app = Flask("factory")
    extension = FlaskDeferred(threads=2)
    original = app.wsgi_app
    extension.init_app(app)
    assert isinstance(app.wsgi_app, DeferredMiddleware) and app.wsgi_app.app == original
    assert app.extensions["fcgi_finish"] is extension and extension.middleware is app.wsgi_app
    with pytest.raises(ValueError, match="threads"):  # settings reach the middleware
        FlaskDeferred(Flask("bad"), threads=0)


def test_with_the_journal_on_the_call_still_runs_in_memory(seen, tmp_path):
    # the app object cannot be journaled: defer_in_app's calls are volatile, never refused
    app = apps_flask.make_app("journaled", journal=str(tmp_path / "journal.sqlite3"))
    status, _body, response = call(app, "/in-app", "tag=j")
    response.close()
    assert status == "200 OK"
    wait_for(lambda: seen, what="the deferred call")
    assert seen[0]["tag"] == "j" and seen[0]["app"] == "journaled"
