"""What checkpointing costs a running job: the training stall per save, and the time from a restart
(`zerotrain train --resume auto`) to the first resumed step against the time from a cold start to the first step.

Runs the real CLI on 2 ranks with a ~69M-parameter Llama (configs/demo.yaml's data, widened as in
bench/checkpoint_io.py), `--repeats` times: a cold run of 6 steps saving every 2, then a restart of it to step 8.
Times are wall clock from starting the command to the step's record in metrics.jsonl; the stall is the trainer's
own `perf/checkpoint_s` (the loop stands still for the save) against the median step time.

    .venv/bin/python bench/resume_latency.py [--repeats 2] [--stage 2] [--hidden 768] [--layers 8]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def zerotrain(*args: str) -> float:
    """Run the CLI; returns the wall time at which it was started."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, check=True, capture_output=True)
    return started


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_time(run_dir: Path, step: int) -> float:
    return next(r["time"] for r in records(run_dir) if r["step"] == step and "train/loss" in r)


def one_run(run_dir: Path, model: list[str]) -> dict:
    sets = [f"run.output_dir={run_dir}", *model, "train.log_every=1", "eval.every=0", "checkpoint.every=2",
            "optim.warmup_steps=1"]
    args = [str(DEMO), *[a for s in sets for a in ("--set", s)]]
    cold_start = zerotrain("train", *args, "--set", "train.max_steps=6")
    saves = [r["perf/checkpoint_s"] for r in records(run_dir) if "perf/checkpoint_s" in r]
    steps = [r["perf/step_s"] for r in records(run_dir) if "perf/step_s" in r and r["step"] > 1]
    restart = zerotrain("train", *args, "--set", "train.max_steps=8", "--resume", "auto")
    return {"cold_s": step_time(run_dir, 1) - cold_start, "restart_s": step_time(run_dir, 7) - restart,
            "save_s": statistics.median(saves), "step_s": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    model = [f"zero.stage={args.stage}", f"model.config.hidden_size={args.hidden}",
             f"model.config.intermediate_size={args.hidden * 8 // 3}", f"model.config.num_hidden_layers={args.layers}",
             f"model.config.num_attention_heads={args.hidden // 64}", f"model.config.num_key_value_heads={args.hidden // 64}",
             "train.micro_batch_size=2", "train.global_batch_size=4"]
    zerotrain("prepare", str(DEMO))
    runs = []
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").exists() else None) as tmp:
        for repeat in range(args.repeats):
            runs.append(one_run(Path(tmp) / f"run{repeat}", model))
            print(json.dumps(runs[-1]), flush=True)
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"ZeRO {args.stage}, 2 ranks, medians of {args.repeats}: save stalls training {median['save_s']:.2f} s "
          f"= {median['save_s'] / median['step_s']:.2f} steps of {median['step_s']:.2f} s; restart to first resumed "
          f"step {median['restart_s']:.1f} s vs cold start to first step {median['cold_s']:.1f} s: "
          f"ratio {median['restart_s'] / median['cold_s']:.2f}")


if __name__ == "__main__":
    main()
