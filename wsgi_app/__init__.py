"""The application side: the deferred-work middleware and the demo application.

``wsgi_app:application`` is the demo, wrapped in ``DeferredMiddleware``. It is
built on first use, not on import, so ``from wsgi_app.deferred import defer``
never depends on the demo's settings (a bad ``DEFERRED_BACKLOG`` fails where the
middleware is made, naming the variable, not at every import of the package).
"""

from __future__ import annotations

from typing import Any

__all__ = ["application"]


def __getattr__(name: str) -> Any:
    if name == "application":
        from .demo import application

        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
