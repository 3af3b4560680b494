"""What a save costs the training loop, with asynchronous saves (checkpoint.async, the default) and in place, and
how fast a save reaches the disk against the disk's own sequential write + fsync.

Runs the real CLI on 2 ranks with a ~69M-parameter Llama (configs/demo.yaml's data, widened), saving every 2 of
8 steps, `--repeats` times alternating async and in-place runs. From each run's metrics.jsonl: the stall (the
trainer's `perf/checkpoint_s`, the loop standing still) against the median step, the save's duration until it
committed (`perf/checkpoint_write_s`: every rank's files written, fsynced, hashed, the manifest and rename done)
and its bandwidth (checkpoint bytes / that duration), against a plain sequential write + fsync of as many bytes,
measured in the same run. In-place saves are timed as the stall itself.

    .venv/bin/python bench/checkpoint_io.py [--repeats 2] [--stage 2] [--hidden 768] [--layers 8]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def model_overrides(stage: int, hidden: int, layers: int) -> list[str]:
    heads = hidden // 64
    return [f"zero.stage={stage}", f"model.config.hidden_size={hidden}", f"model.config.intermediate_size={hidden * 8 // 3}",
            f"model.config.num_hidden_layers={layers}", f"model.config.num_attention_heads={heads}",
            f"model.config.num_key_value_heads={heads}", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.log_every=1", "eval.every=0", "checkpoint.every=2", "checkpoint.keep_last=1",
            "optim.warmup_steps=1", "train.max_steps=8"]


def one_run(run_dir: Path, overrides: list[str], asynchronous: bool) -> dict:
    sets = [f"run.output_dir={run_dir}", *overrides, f"checkpoint.async={str(asynchronous).lower()}"]
    subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(DEMO), *[a for s in sets for a in ("--set", s)]],
                   cwd=REPO, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stalls = [r["perf/checkpoint_s"] for r in records if "perf/checkpoint_s" in r]
    writes = [r["perf/checkpoint_write_s"] for r in records if "perf/checkpoint_write_s" in r] or stalls
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    size = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
    return {"stall_s": statistics.median(stalls), "write_s": statistics.median(writes), "bytes": size,
            "step_s": statistics.median(r["perf/step_s"] for r in records if "perf/step_s" in r and r["step"] > 1)}


def disk_write_gbps(folder: Path, nbytes: int) -> float:
    block = os.urandom(16 * 2**20)
    path = folder / "disk-probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    written = path.stat().st_size
    path.unlink()
    return written / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "launcher.cli", "prepare", str(DEMO)], cwd=REPO, check=True,
                   capture_output=True)
    overrides = model_overrides(args.stage, args.hidden, args.layers)
    runs = {True: [], False: []}
    disk = []
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").exists() else None) as tmp:
        for repeat in range(args.repeats):
            for asynchronous in (True, False):
                run = one_run(Path(tmp) / f"run-{repeat}-{asynchronous}", overrides, asynchronous)
                runs[asynchronous].append(run)
                print(json.dumps({"async": asynchronous, **run}), flush=True)
            disk.append(disk_write_gbps(Path(tmp), runs[True][-1]["bytes"]))
    disk_gbps = statistics.median(disk)
    print(f"ZeRO {args.stage}, 2 ranks, {runs[True][0]['bytes'] / 1e9:.2f} GB per checkpoint, medians of "
          f"{args.repeats}; the disk's sequential write + fsync {disk_gbps:.2f} GB/s")
    for asynchronous, name in ((True, "async   "), (False, "in place")):
        median = {key: statistics.median(r[key] for r in runs[asynchronous]) for key in runs[asynchronous][0]}
        gbps = median["bytes"] / median["write_s"] / 1e9
        print(f"  {name}: the loop stands still {median['stall_s']:.2f} s = {median['stall_s'] / median['step_s']:.2f} "
              f"steps of {median['step_s']:.2f} s; committed after {median['write_s']:.2f} s = {gbps:.2f} GB/s = "
              f"{gbps / disk_gbps:.2f}x the disk")


if __name__ == "__main__":
    main()
