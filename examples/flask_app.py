"""Flask with deferred work: ``fcgi-serve examples.flask_app:app``.

Flask pops its app context before the response's ``close()``, so deferred work
that needs ``current_app`` (config, extensions) pushes one of its own.
"""

from flask import Flask, current_app, request

from wsgi_app.deferred import DeferredMiddleware, defer

app = Flask(__name__)
app.config["WELCOME_FROM"] = "hello@example.org"
app.wsgi_app = DeferredMiddleware(app.wsgi_app)  # wrap the WSGI app, keep the Flask object
sent: list[str] = []


def send_welcome(flask_app: Flask, address: str) -> None:
    with flask_app.app_context():  # the request's context is gone by now
        sent.append(f"{current_app.config['WELCOME_FROM']} -> {address}")


@app.post("/signup")
def signup():
    address = request.form["email"]
    defer(request.environ, send_welcome, current_app._get_current_object(), address)
    return f"welcome, {address}\n"
