"""An app that handles SIGALRM itself, as one timing its work with ``signal.alarm`` does:
the worker must leave that handler alone."""

from __future__ import annotations

import signal

from tests.apps import hello, note

app = hello


def _on_alarm(signum, frame) -> None:
    note("alarm")


signal.signal(signal.SIGALRM, _on_alarm)
