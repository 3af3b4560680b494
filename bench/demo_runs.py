"""Real `zerotrain` runs on the demo's data for the benchmarks: the data prepared once, a run trained with
overrides and read back (its metrics and rank 0's log), medians of logged metrics after start-up."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
sys.path.insert(0, str(REPO))

from trainer.observe.metrics import read_records  # noqa: E402


@dataclass
class Run:
    records: list[dict]
    log: str  # rank 0's

    def median(self, key: str, after: int = 1) -> float:
        """The median of metric `key` over the steps after the first `after` (start-up)."""
        return statistics.median(r[key] for r in self.records if key in r and r["step"] > after)

    def log_line(self, text: str) -> str:
        """The message of the first line of rank 0's log containing `text`."""
        return next(line for line in self.log.splitlines() if text in line).split("INFO ")[1]


def prepare() -> None:
    subprocess.run([sys.executable, "-m", "launcher.cli", "prepare", str(DEMO)], cwd=REPO, check=True,
                   capture_output=True)


def train(sets: list[str], nproc: int = 2) -> Run:
    """`zerotrain train configs/demo.yaml --set ...` on `nproc` ranks in a throw-away run directory, logging
    every step, without saves or validations."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        sets = [f"run.output_dir={run_dir}", "train.log_every=1", "optim.warmup_steps=1", "eval.every=0",
                "checkpoint.every=0", *sets]
        subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(DEMO), "--nproc", str(nproc),
                        *[a for s in sets for a in ("--set", s)]], cwd=REPO, check=True, capture_output=True)
        return Run(read_records(run_dir / "metrics.jsonl"), (run_dir / "logs" / "rank0.log").read_text())
