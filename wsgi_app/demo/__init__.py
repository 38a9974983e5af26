"""The demo: PHP's finish-request experiment as a WSGI app (``app``), and the client
that runs it through the stack and reads its log (``client``).

``wsgi_app.demo:application`` is built on first use, not on import, so running the
client never makes the demo's middleware (nor fails on its settings).
"""

from __future__ import annotations

from typing import Any

__all__ = ["application"]


def __getattr__(name: str) -> Any:
    if name == "application":
        from .app import application

        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
