"""The deferred-work journal: calls recorded before the visitor has the page, so they
survive the worker's death. ``store`` (SQLite), ``log`` (each worker's append log),
``python -m wsgi_app.journal`` (list, retry and purge)."""

from .store import Journal

__all__ = ["Journal"]
