"""The data_pipeline tests' prepared plays (plays.py), made once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_pipeline import TokenizerConfig
from data_pipeline.prepare import prepare
from plays import VOCAB, data_config


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    logs = []
    manifest = prepare(data_config(tmp_path_factory.mktemp("prepared")), TokenizerConfig(vocab_size=VOCAB), logs.append)
    return manifest, logs


@pytest.fixture
def prepared_copy(prepared, tmp_path) -> Path:
    """A private copy of the prepared data, for tests that damage it."""
    return Path(shutil.copytree(prepared[0].dir, tmp_path / "copy"))


