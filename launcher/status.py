"""`zerotrain status RUN_DIR`: where a run stands, from the files it writes."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.errors import UserError
from launcher.slurm import job_state
from trainer import run_files
from trainer.checkpointing import store
from trainer.config import load_config
from trainer.observe.metrics import read_records

NAN = float("nan")  # a value a damaged record lacks


def run_status(run_dir: Path) -> str:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a zerotrain run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    lines = [f"run {cfg.run.name} ({run_dir})"]
    lines += _progress(cfg, run_dir)
    found = store.find_intact(run_dir, store.checksums)  # what a resume or an export would take
    lines += [f"  checkpoint {problem}" for problem in found.damaged]
    last = store.checkpoints_dir(run_dir) / found.tag if found.tag else "none intact" if found.damaged else \
        "none yet"
    lines.append(f"  last checkpoint: {last}")
    lines += _slurm(run_dir)
    if (run_dir / "report.png").is_file():
        lines.append(f"  curves: {run_dir / 'report.png'}")
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"  tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    lines += _trackers(run_dir)
    lines.append(f"  logs: {run_dir / 'logs'}   metrics: {run_dir / 'metrics.jsonl'}")
    return "\n".join(lines)


def _progress(cfg, run_dir: Path) -> list[str]:
    """Losses, validation, results and throughput, from metrics.jsonl and summary.json (each said damaged in
    a line of its own when it is)."""
    lines = []
    try:
        records = read_records(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    except UserError as e:
        records, lines = [], [f"  {e}"]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    try:
        summary = run_files.read(run_dir / "summary.json", run_files.Summary).model_dump() \
            if (run_dir / "summary.json").is_file() else {}
    except UserError as e:
        summary, lines = {}, [*lines, f"  {e}"]
    if train:
        first, last = train[0], train[-1]
        lines.append(f"  step {last['step']}/{cfg.train.max_steps}   loss {first['train/loss']:.3f} at step "
                     f"{first['step']} -> {last['train/loss']:.3f} at step {last['step']}")
    if val:
        scores = ("perplexity", "val/ppl", ".1f") if "val/ppl" in val[-1] else ("accuracy", "val/accuracy", ".3f")
        value = val[-1].get(scores[1], NAN)
        lines.append(f"  validation loss {val[-1]['val/loss']:.3f}   {scores[0]} {value:{scores[2]}}   (step "
                     f"{val[-1]['step']})")
    return lines + _results(cfg, summary, train)


def _results(cfg, summary: dict, train: list[dict]) -> list[str]:
    lines = []
    if isinstance(summary.get("test_accuracy"), float):
        lines.append(f"  test accuracy {summary['test_accuracy']:.3f}   macro-F1 "
                     f"{summary.get('test_macro_f1', NAN):.3f}   (weights of step {summary.get('test_step')}, the "
                     f"best by {cfg.eval.best_metric})")
    if summary.get("best_checkpoint"):
        lines.append(f"  best checkpoint: {summary['best_checkpoint']}")
    if summary.get("tokens_per_s"):
        lines.append(f"  throughput {summary['tokens_per_s']:,.0f} tokens/s over {cfg.world_size} ranks")
    elif train and "perf/tokens_per_s" in train[-1]:
        lines.append(f"  throughput {train[-1]['perf/tokens_per_s']:,.0f} tokens/s (last log step)")
    return lines


def _slurm(run_dir: Path) -> list[str]:
    try:
        jobs = run_files.job_ids(run_dir / "slurm" / "jobs")
    except UserError as e:
        return [f"  {e}"]
    if not jobs:
        return []
    return [f"  slurm job {jobs[-1]}: {job_state(jobs[-1]) or 'not known to Slurm (any more)'}   "
            f"log {run_dir / 'slurm' / f'slurm-{jobs[-1]}.out'}"]


def _trackers(run_dir: Path) -> list[str]:
    """The MLflow and W&B runs the run's metrics went to (RUN_DIR/trackers.json)."""
    path = run_dir / "trackers.json"
    if not path.is_file():
        return []
    try:
        runs = run_files.read(path, run_files.TrackerRuns).root
    except UserError as e:
        return [f"  {e}"]
    return [f"  {name}: run {run.run_id} at {run.where}" +
            (f", sent up to step {run.step}" if run.step is not None else "") for name, run in runs.items()]
