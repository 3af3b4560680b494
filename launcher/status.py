"""`zerotrain status RUN_DIR`: where a run stands, from the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.slurm import job_state
from trainer.checkpointing import store
from data_pipeline.errors import UserError
from trainer.config import load_config
from trainer.observe.metrics import read_records


def run_status(run_dir: Path) -> str:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a zerotrain run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    records = read_records(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    found = store.find_intact(run_dir, store.checksums)  # what a resume or an export would take
    summary_file = run_dir / "summary.json"
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    except ValueError:  # written whole since summary.json is durable; an older run's may be torn
        summary = {}
    lines = [f"run {cfg.run.name} ({run_dir})"]
    if train:
        first, last = train[0], train[-1]
        lines.append(f"  step {last['step']}/{cfg.train.max_steps}   loss {first['train/loss']:.3f} at step "
                     f"{first['step']} -> {last['train/loss']:.3f} at step {last['step']}")
    if val:
        scores = ("perplexity", "val/ppl", ".1f") if "val/ppl" in val[-1] else ("accuracy", "val/accuracy", ".3f")
        lines.append(f"  validation loss {val[-1]['val/loss']:.3f}   {scores[0]} {val[-1][scores[1]]:{scores[2]}}"
                     f"   (step {val[-1]['step']})")
    if "test_accuracy" in summary:
        lines.append(f"  test accuracy {summary['test_accuracy']:.3f}   macro-F1 {summary['test_macro_f1']:.3f}"
                     f"   (weights of step {summary['test_step']}, the best by {cfg.eval.best_metric})")
    if summary.get("best_checkpoint"):
        lines.append(f"  best checkpoint: {summary['best_checkpoint']}")
    if summary.get("tokens_per_s"):
        lines.append(f"  throughput {summary['tokens_per_s']:,.0f} tokens/s over {cfg.world_size} ranks")
    elif train:
        lines.append(f"  throughput {train[-1]['perf/tokens_per_s']:,.0f} tokens/s (last log step)")
    for problem in found.damaged:
        lines.append(f"  checkpoint {problem}")
    last = store.checkpoints_dir(run_dir) / found.tag if found.tag else "none intact" if found.damaged else \
        "none yet"
    lines.append(f"  last checkpoint: {last}")
    jobs_file = run_dir / "slurm" / "jobs"
    if jobs_file.is_file():
        job = jobs_file.read_text().split()[-1]
        lines.append(f"  slurm job {job}: {job_state(job) or 'not known to Slurm (any more)'}   "
                     f"log {run_dir / 'slurm' / f'slurm-{job}.out'}")
    if (run_dir / "report.png").is_file():
        lines.append(f"  curves: {run_dir / 'report.png'}")
    lines.append(f"  tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    lines.append(f"  logs: {run_dir / 'logs'}   metrics: {run_dir / 'metrics.jsonl'}")
    return "\n".join(lines)
