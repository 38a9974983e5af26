"""The docs a newcomer reads: the configuration page is what the tables make now, and
every relative link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from fcgi_finish import reference
from tests.procs import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code; an image's ![alt](target) too. Targets with a scheme
# (https:, mailto:) are someone else's to keep.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


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


def test_every_relative_link_resolves_to_a_file_and_its_heading():
    broken = []
    for page in PAGES:
        text = CODE.sub("", FENCE.sub("", page.read_text()))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
    assert len(PAGES) >= 5, "README.md and at least 4 pages in docs/"


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation but
    hyphens and underscores dropped, spaces as hyphens, a repeat numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def _cells(page: str) -> list[str]:
    return [
        cell.strip()
        for line in page.splitlines()
        if line.startswith("|")
        for cell in re.split(r"(?<!\\)\|", line)[1:-1]
    ]
