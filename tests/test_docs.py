"""The documentation points at what exists: every relative link of the README and docs/ names a file of the
repository, and every `make` target they name is a target of the Makefile."""

from __future__ import annotations

import re

from helpers import REPO

DOCS = [REPO / "README.md", REPO / "slurm" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_relative_links_name_files_that_exist():
    links = [(doc, target) for doc in DOCS for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
             if not re.match(r"[a-z]+:|#", target)]  # not a web address, not an anchor of the same page
    broken = [f"{doc.relative_to(REPO)}: {target}" for doc, target in links
              if not (doc.parent / target.split("#")[0]).exists()]
    assert len(links) > 5 and not broken, broken


def test_make_targets_the_docs_name_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = {(doc.relative_to(REPO), target) for doc in DOCS
             for target in re.findall(r"`make ([a-z][\w-]*)", doc.read_text())}
    assert named and not [(doc, target) for doc, target in named if target not in targets]
