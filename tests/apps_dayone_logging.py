"""An app whose import does what Django's settings.LOGGING does when Django starts: a
root handler with its own format, and every existing logger switched off
(disable_existing_loggers). The worker's own lines must come through unchanged."""

from __future__ import annotations

import logging.config

from tests.apps_dayone import fails

logging.config.dictConfig(
    {
        "version": 1,
        "disable_existing_loggers": True,
        "formatters": {"bare": {"format": "APP %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "bare"}},
        "root": {"handlers": ["console"], "level": "WARNING"},
    }
)

application = fails
