"""Every relative link in the committed Markdown (README, RESULTS, BENCHMARKS, docs/) names a file that exists."""

from __future__ import annotations

import re

import pytest

from tests.paths import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCS = sorted([*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md")])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    broken = []
    for link in LINK.findall(doc.read_text()):
        if "://" in link or link.startswith(("#", "mailto:")):
            continue
        path = link.split("#")[0]
        if path and not (doc.parent / path).exists():
            broken.append(link)
    assert not broken, f"{doc.relative_to(REPO)}: broken links {broken}"


def test_the_docs_are_found():
    assert {"README.md", "RESULTS.md", "BENCHMARKS.md"} <= {p.name for p in DOCS}
