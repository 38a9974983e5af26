"""The application side: the deferred-work middleware and the demo application.

``wsgi_app:application`` is the demo, wrapped in ``DeferredMiddleware``.
"""

from .demo import application

__all__ = ["application"]
