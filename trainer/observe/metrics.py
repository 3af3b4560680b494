"""Where numbers go: TensorBoard scalars, one JSON line per logged step, the console and a progress bar.

Only rank 0 writes them; the other ranks' `MetricsLogger` notes only their own memory, in their own log (what
the launcher quotes when a rank is killed), so the loop needs no rank checks.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

from data_pipeline.errors import UserError
from trainer import run_files
from trainer.config import dotted

log = logging.getLogger("zerotrain")


class MetricsLogger:
    def __init__(self, run_dir: Path, max_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.jsonl = _open_from(run_dir / "metrics.jsonl", start_step)
        # A bar only for a person at a terminal; logs and CI get plain lines.
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            memory = {key: value for key, value in metrics.items() if key.startswith("mem/")}
            if memory:
                log.info(f"step {step:>6} " + " ".join(f"{key} {_fmt(value)}" for key, value in memory.items()))
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
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
            self.writer.add_text(tag, f"```\n{text}\n```", global_step=step)

    def hparams(self, config: dict, results: dict[str, float]) -> None:
        """The run's settings beside its final results, for TensorBoard's HPARAMS tab (comparing runs). Written
        into the run's own event file: SummaryWriter.add_hparams would start a separate run folder."""
        if not self.enabled:
            return
        flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in dotted(config).items()}
        for summary in hparams(flat, results):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


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
