"""The README's Flask and Django examples, served by the worker."""

from __future__ import annotations

from tests.procs import wait_for


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
    from examples import django_app

    client = serve(django_app.application).client()
    resp = client.request("/signup?email=bob@example.org")
    assert resp.status == 200 and resp.body == b"welcome, bob@example.org\n"
    wait_for(lambda: django_app.sent, what="the deferred welcome")
    assert django_app.sent == ["bob@example.org"]
