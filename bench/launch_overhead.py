"""Launch overhead: `zerotrain train` (config checks + torch's elastic agent) against a bare `torchrun` of
the same rank entry point, and - on the local Slurm cluster of tests/cluster.py - `zerotrain submit` to the
first training step.

Each launch trains configs/tiny.yaml (2 ranks) into a fresh run directory; timed from starting the command
to the first step's record in metrics.jsonl and to the command's end. Alternated `--repeats` times; medians.

    .venv/bin/python bench/launch_overhead.py [--repeats 3] [--slurm]
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
TINY = REPO / "configs" / "tiny.yaml"


def first_step_time(run_dir: Path, deadline: float) -> float:
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                if record["step"] == 1 and "train/loss" in record:
                    return record["time"]
        time.sleep(0.05)
    raise TimeoutError(f"no first step in {run_dir}")


def timed(command: list[str], run_dir: Path, env=None) -> tuple[float, float]:
    """(seconds to the first step, seconds to the end) of a command that trains into run_dir."""
    started = time.time()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=env)
    ended = time.time()
    return first_step_time(run_dir, ended + 1) - started, ended - started


def zerotrain_train(run_dir: Path, prepared: Path) -> tuple[float, float]:
    return timed([sys.executable, "-m", "launcher.cli", "train", str(TINY), "--set", f"run.output_dir={run_dir}",
                  "--set", f"data.prepared_dir={prepared}"], run_dir)


def bare_torchrun(run_dir: Path, prepared: Path) -> tuple[float, float]:
    """torchrun straight onto the rank entry point, with the resolved config zerotrain would write."""
    from trainer.config import load_config

    run_dir.mkdir(parents=True)
    cfg = load_config(TINY, [f"run.output_dir={run_dir}", f"data.prepared_dir={prepared}"])
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                  "trainer.main", str(run_dir / "config.yaml")], run_dir)


def slurm_submit(run_dir: Path, prepared: Path, cluster) -> tuple[float, float]:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "submit", str(TINY), "--set",
                          f"run.output_dir={run_dir}", "--set", f"data.prepared_dir={prepared}", "--nodes", "2",
                          "--nproc-per-node", "1"], cwd=REPO, check=True, capture_output=True, text=True,
                         env=cluster.env).stdout
    job = out.split("submitted job ")[1].split()[0]
    cluster.wait(job, timeout=600)
    return first_step_time(run_dir, time.time() + 1) - started, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slurm", action="store_true", help="also time `zerotrain submit` on a local cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").exists() else None) as tmp:
        tmp = Path(tmp)
        prepared = tmp / "prepared"
        subprocess.run([sys.executable, "-m", "launcher.cli", "prepare", str(TINY), "--set",
                        f"data.prepared_dir={prepared}"], cwd=REPO, check=True, capture_output=True)
        launchers = {"zerotrain train": zerotrain_train, "bare torchrun": bare_torchrun}
        if args.slurm:
            sys.path.insert(0, str(REPO / "tests"))
            from cluster import SlurmCluster

            cluster = SlurmCluster(tmp / "slurm", nodes=2).__enter__()
            launchers["zerotrain submit (2 nodes)"] = lambda run_dir, prepared: slurm_submit(run_dir, prepared,
                                                                                              cluster)
        times = {name: [] for name in launchers}
        try:
            for repeat in range(args.repeats):
                for name, launch in launchers.items():
                    times[name].append(launch(tmp / f"{name.split()[1]}{repeat}", prepared))
                    print(name, [f"{t:.1f}" for t in times[name][-1]], flush=True)
        finally:
            if args.slurm:
                cluster.__exit__(None, None, None)
    base_first, base_total = (statistics.median(t[i] for t in times["bare torchrun"]) for i in (0, 1))
    for name, runs in times.items():
        first, total = (statistics.median(t[i] for t in runs) for i in (0, 1))
        print(f"{name}: first step after {first:.1f} s ({first / base_first:.2f}x bare torchrun), "
              f"done after {total:.1f} s ({total / base_total:.2f}x)")


if __name__ == "__main__":
    main()
