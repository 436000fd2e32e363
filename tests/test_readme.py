"""README.md is the front page; the reference is docs/, which `make docs` checks with mkdocs --strict. The
README is outside that build, so its own links are checked here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_links_point_at_files_that_exist() -> None:
    targets = [t for t in LINK.findall(README.read_text()) if not t.startswith(("http://", "https://", "#"))]
    assert targets, "the README links into docs/"
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert missing == []


def test_readme_stays_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= 250  # the reference belongs in docs/
