"""The docs a newcomer reads: the configuration page is what the tables make now."""

from __future__ import annotations

import re

from fcgi_finish import reference
from tests.procs import ROOT


def test_the_configuration_page_is_what_the_tables_make_now():
    """docs/configuration.md is generated from fcgi.options, wsgi_app.deferred and
    fcgi_finish.settings: an option added, renamed or given a new default there shows
    here until the page is made again."""
    page = ROOT / reference.PAGE
    assert page.exists(), f"{reference.PAGE} is missing: run `{reference.COMMAND}`"
    current = reference.render()
    assert page.read_text() == current, (
        f"{reference.PAGE} is not what the tables make now: run `{reference.COMMAND}` "
        f"(python -m fcgi_finish.reference {reference.PAGE}) and commit the result"
    )
    for name in ("FCGI_THREADS", "DEFERRED_JOURNAL", "NGINX_LISTEN", "--request-timeout"):
        assert name in current, name
    too_long = [cell for cell in _cells(current) if len(cell) > reference.CELL]
    assert not too_long, too_long


def _cells(page: str) -> list[str]:
    return [
        cell.strip()
        for line in page.splitlines()
        if line.startswith("|")
        for cell in re.split(r"(?<!\\)\|", line)[1:-1]
    ]
