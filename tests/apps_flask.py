"""Flask apps for the flask_support tests: ``make_app()`` builds a fresh one each time."""

from __future__ import annotations

import asyncio
import contextvars

from flask import Flask, current_app, g, has_request_context, request

from wsgi_app.deferred import add_task
from wsgi_app.flask_support import FlaskDeferred, defer_in_app

seen: list[dict[str, object]] = []
# bound by the view, as a request-id middleware or structlog's bind_contextvars would
shopper: contextvars.ContextVar[str] = contextvars.ContextVar("shopper", default="<none>")


def what_the_call_sees(tag: str) -> None:
    seen.append(
        {
            "tag": tag,
            "app": current_app.name,
            "greeting": current_app.config["GREETING"],
            "g_user": g.get("user"),
            # the request's context as at defer(): Flask's request (finished by now) too
            "request_path": request.path if has_request_context() else None,
            "shopper": shopper.get(),
        }
    )


async def what_a_coroutine_sees(tag: str) -> None:
    await asyncio.sleep(0)
    what_the_call_sees(tag)


def broken(tag: str) -> None:
    seen.append({"tag": tag})
    raise LookupError(f"deferred {tag} broke")


def plain(tag: str) -> None:
    seen.append({"tag": tag, "plain": True})


def helper_far_below_the_view(tag: str) -> None:
    """No request, no environ at hand: only the context variable finds the request."""
    defer_in_app(what_the_call_sees, tag)


def make_app(name: str = "shop", **settings: object) -> Flask:
    app = Flask(name)
    app.config["GREETING"] = f"hello from {name}"
    FlaskDeferred(app, **settings)

    @app.get("/in-app")
    def in_app():
        g.user = "ada"  # the request's g: not what the deferred call gets
        shopper.set("ada")  # a context variable: the deferred call sees it
        helper_far_below_the_view(request.args["tag"])
        return "queued\n"

    @app.get("/coroutine")
    def coroutine():
        defer_in_app(what_a_coroutine_sees, request.args["tag"])
        return "queued\n"

    @app.get("/broken")
    def broken_then_fine():
        defer_in_app(broken, "first")
        defer_in_app(what_the_call_sees, "second")
        return "queued\n"

    @app.get("/add-task")
    def with_add_task():
        add_task(plain, request.args["tag"])
        return "queued\n"

    return app
