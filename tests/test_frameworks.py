"""The README's Flask and Django examples, served by the worker; add_task() with no environ."""

from __future__ import annotations

import pytest

from tests.inprocess import call
from tests.procs import wait_for
from wsgi_app.deferred import DeferredMiddleware, add_task, current_environ, drain


def test_flask_example(serve):
    from examples import flask_app

    client = serve(flask_app.app).client()
    resp = client.request(
        "/signup",
        method="POST",
        body=b"email=ada%40example.org",
        extra={"CONTENT_TYPE": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 200 and resp.body == b"welcome, ada@example.org\n"
    wait_for(lambda: flask_app.sent, what="the deferred welcome")
    assert flask_app.sent == ["hello@example.org -> ada@example.org"]


def test_django_example(serve):
    from django.test.utils import override_settings

    from examples import django_app

    # Django's settings are per process: another test module may have configured them first
    with override_settings(ROOT_URLCONF="examples.django_app"):
        client = serve(django_app.application).client()
        resp = client.request("/signup?email=bob@example.org")
    assert resp.status == 200 and resp.body == b"welcome, bob@example.org\n"
    wait_for(lambda: django_app.sent, what="the deferred welcome")
    assert django_app.sent == ["bob@example.org"]


seen: list[object] = []


def _try_add_task(tag: str) -> None:
    """Deferred work itself: no request here, so add_task() must refuse."""
    try:
        add_task(seen.append, "nested")
    except RuntimeError as exc:
        seen.append((tag, str(exc).split(" (")[0]))


def _body():
    yield b"streamed "
    seen.append(("streaming", current_environ()))  # after the app call returned
    yield b"body\n"


def _app(environ, start_response):
    add_task(seen.append, "first")
    add_task(_try_add_task, "in deferred work")
    start_response("200 OK", [("Content-Type", "text/plain")])
    assert current_environ() is environ
    return _body()


def test_add_task_sees_only_the_app_call_of_its_own_request():
    seen.clear()
    app = DeferredMiddleware(_app)
    with pytest.raises(RuntimeError, match="only inside a request"):
        add_task(seen.append, "outside")
    _, body, response = call(app, "/")
    assert body == b"streamed body\n"
    response.close()
    wait_for(lambda: len(seen) == 3, what="the two deferred calls")
    assert drain(10) == 0
    assert seen == [
        ("streaming", None),
        "first",
        (
            "in deferred work",
            "add_task() runs only inside a request served through DeferredMiddleware",
        ),
    ]
    assert current_environ() is None  # reset after the app call, also in this thread
