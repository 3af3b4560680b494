"""Throughput of zerotrain's training loop against a minimal hand-written DeepSpeed loop.

Both train the same model with the same DeepSpeed config, batch and data on the same number of ranks
(configs/demo.yaml unless told otherwise). The two are run alternately, `--repeats` times each, so the
machine's noise reaches both; the ratio of medians is the figure (goal: >= 0.97).

    .venv/bin/python bench/loop_overhead.py [--config configs/demo.yaml] [--steps 41] [--repeats 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 10  # zerotrain's first log window (step 1: start-up) is left out of its tokens/s, as here


def zerotrain_tokens_per_s(config: str, steps: int, nproc: int, workdir: Path) -> float:
    run_dir = workdir / f"run{len(list(workdir.iterdir()))}"
    sets = [f"run.output_dir={run_dir}", f"train.max_steps={steps}", f"train.log_every={LOG_EVERY}",
            "eval.every=0", "checkpoint.every=0", "optim.warmup_steps=1", f"launch.nproc_per_node={nproc}"]
    subprocess.run([sys.executable, "-m", "launcher.cli", "train", config, *[x for s in sets for x in ("--set", s)]],
                   cwd=REPO, check=True, capture_output=True)
    return json.loads((run_dir / "summary.json").read_text())["tokens_per_s"]


def baseline_tokens_per_s(config: str, steps: int, nproc: int) -> float:
    resolved = Path(tempfile.mkdtemp()) / "config.yaml"
    from trainer.config import load_config

    resolved.write_text(load_config(config, [f"launch.nproc_per_node={nproc}"]).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)), "DS_ACCELERATOR":
           os.environ.get("DS_ACCELERATOR", "cpu")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                          str(REPO / "bench" / "minimal_deepspeed_loop.py"), str(resolved), str(steps), "1"],
                         cwd=REPO, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            base.append(baseline_tokens_per_s(args.config, args.steps, args.nproc))
            ours.append(zerotrain_tokens_per_s(args.config, args.steps, args.nproc, Path(tmp)))
            print(f"repeat {i + 1}: minimal DeepSpeed loop {base[-1]:,.0f} tokens/s, zerotrain {ours[-1]:,.0f} tokens/s",
                  flush=True)
    ratio = statistics.median(ours) / statistics.median(base)
    print(f"zerotrain / minimal DeepSpeed loop throughput: {ratio:.3f} "
          f"({statistics.median(ours):,.0f} vs {statistics.median(base):,.0f} tokens/s, {args.nproc} ranks, "
          f"{args.config})")


if __name__ == "__main__":
    main()
