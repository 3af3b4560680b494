"""Where numbers go: one JSON line per logged step (RUN_DIR/metrics.jsonl), the console and a progress bar, and
the trackers of `metrics.trackers` (trainer/observe/trackers.py: TensorBoard, MLflow, W&B).

Only rank 0 writes them; the other ranks' `MetricsLogger` notes only their own memory, in their own log (what
the launcher quotes when a rank is killed), so the loop needs no rank checks.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data_pipeline.errors import UserError
from trainer import run_files
from trainer.config import Config
from trainer.observe.trackers import trackers

log = logging.getLogger("zerotrain")


class MetricsLogger:
    def __init__(self, cfg: Config, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = _open_from(cfg.run_dir / "metrics.jsonl", start_step)
        # A bar only for a person at a terminal; logs and CI get plain lines.
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.trackers = trackers(cfg.metrics, cfg.run_dir, cfg.run.name, start_step)
        for tracker in self.trackers:
            tracker.start(cfg.model_dump(mode="json"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            memory = {key: value for key, value in metrics.items() if key.startswith("mem/")}
            if memory:
                log.info(f"step {step:>6} " + " ".join(f"{key} {_fmt(value)}" for key, value in memory.items()))
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for tracker in self.trackers:
            tracker.log(step, metrics)
        line = f"step {step:>6} " + " ".join(f"{_short(k)} {_fmt(v)}" for k, v in metrics.items())
        if self.bar.disable:
            log.info(line)
        else:
            self.bar.set_postfix_str(line.split(" ", 2)[-1], refresh=False)
            self.bar.write(line)

    def advance(self, step: int) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        if self.enabled:
            for tracker in self.trackers:
                tracker.text(tag, text, step)

    def close(self, code: int, results: dict[str, float], artifacts: list[Path]) -> None:
        """The launch ended with exit `code`: the trackers get the final `results` and the run's `artifacts`."""
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            for tracker in self.trackers:
                tracker.finish(artifacts, results, code)


def _short(name: str) -> str:
    return name.removeprefix("train/").removeprefix("perf/")


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records. Each is written as one line ending in a newline: text after the last newline is
    a record still being written, or one a killed run left half-written - not a record, not damage. A line
    before it that is not a record (trainer/run_files.py's MetricsRecord: an integer step, numbers) is damage: a
    one-line UserError naming the file and the line."""
    if not path.is_file():
        raise UserError(f"{path}: not found (not a zerotrain run directory, or no step logged yet)")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").split("\n")[:-1], 1):
        record = run_files.parse(line, run_files.MetricsRecord, f"{path}: line {number}")
        records.append({"step": record.step, "time": record.time, **record.metrics()})
    return records


def _open_from(path: Path, start_step: int):
    """Append to metrics.jsonl, first dropping records past `start_step` (left by an interrupted run):
    a resumed run logs those steps again, as TensorBoard's purge_step does for the event files."""
    kept = [r for r in read_records(path) if r["step"] <= start_step] if path.exists() else []
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return open(path, "a")
