"""Flask with deferred work: ``fcgi-serve examples.flask_app:app``.

``defer_in_app`` runs the call after the response inside a fresh application
context, so ``current_app`` (config, extensions) works there; ``g`` is a fresh one
and ``request`` is the finished request (its body gone, its session never saved),
so pass what the call needs.
"""

from flask import Flask, current_app, request

from wsgi_app.flask_support import FlaskDeferred, defer_in_app

app = Flask(__name__)
app.config["WELCOME_FROM"] = "hello@example.org"
FlaskDeferred(app)  # wraps app.wsgi_app in DeferredMiddleware, keeps the Flask object
sent: list[str] = []


def send_welcome(address: str) -> None:
    sent.append(f"{current_app.config['WELCOME_FROM']} -> {address}")


@app.post("/signup")
def signup():
    address = request.form["email"]
    defer_in_app(send_welcome, address)
    return f"welcome, {address}\n"
