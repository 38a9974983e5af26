"""``wsgi.errors``: what the application writes there goes to the worker's log."""

from __future__ import annotations

import logging


class ErrorStream:
    """A text stream that logs each line on the ``fcgi.app`` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("fcgi.app")

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.log.warning("%s", line)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass
