"""The documentation points at what exists: every relative link of the README and docs/ names a file of the
repository, every `make` target they name is a target of the Makefile, and the configuration reference is the
one the config schema generates."""

from __future__ import annotations

import re
import subprocess
import sys

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


def test_the_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md: every key of the config, its type, default, resume rule and description (the
    field's docstring in trainer/config.py or data_pipeline/config.py)."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reference = (REPO / "docs" / "configuration.md").read_text()
    for key in ("`run.seed`", "`data.sources[].weight`", "`model.lora.rank`", "`parallel.expert`",
                "`checkpoint.async`", "`data.chat.train_on`"):
        assert key in reference, key
