"""great-expectations' Data Docs read as a person reads them: a page's text, the pages the index links."""

from __future__ import annotations

import html
import re
from pathlib import Path


def page_text(page: Path) -> str:
    """What a browser shows of ``page``: scripts and styles dropped, tags removed, blanks collapsed."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", page.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def validation_pages(docs: Path) -> dict[str, Path]:
    """Suite name -> its validation result page, each one the index links (one validation a build)."""
    index = (docs / "index.html").read_text(encoding="utf-8")
    pages = {}
    for page in sorted((docs / "validations").rglob("*.html")):
        link = page.relative_to(docs).as_posix()
        assert link in index, f"the Data Docs index does not link {link}"
        suite = page.relative_to(docs / "validations").parts[0]
        assert suite not in pages, f"two validations of {suite} in one build: {pages[suite]}, {page}"
        pages[suite] = page
    return pages
