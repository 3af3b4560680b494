"""What the tests share besides fixtures: the `zerotrain` command run as a user runs it, the tiny run's arguments,
a run's losses and metrics, and the processes of runs started in the background (what kill and signal tests act
on). Fixtures are in conftest.py."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from trainer.observe.metrics import read_records

# No test may reach the Hub (the network is off-limits here): datasets/transformers must fail fast instead.
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare"
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 12  # configs/tiny.yaml: max_steps 12, checkpoint and validation every 6, log every step


# Commands that start no ranks run inside the test process: the same code, without a second interpreter
# importing torch and transformers again (seconds per call). `train`, `prepare` and `submit` start processes.
IN_PROCESS = ("export", "status", "plan", "generate", "predict", "chat", "report")


def zerotrain(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None) \
        -> subprocess.CompletedProcess:
    """Run the CLI as a user runs it, from the repository root, and capture its output: in a subprocess, or (the
    commands of IN_PROCESS, without `env`) in this process."""
    if args and str(args[0]) in IN_PROCESS and env is None:
        result = in_process(*args)
    else:
        result = subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=REPO, text=True,
                                capture_output=True, timeout=timeout,
                                env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"zerotrain {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def in_process(*args: str) -> subprocess.CompletedProcess:
    """`zerotrain ARGS` through launcher.cli.main in this process, its output captured."""
    from launcher import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return subprocess.CompletedProcess(["zerotrain", *map(str, args)], code, out.getvalue(), err.getvalue())


def refused(*args: str) -> subprocess.CompletedProcess:
    """`zerotrain ARGS` in this process, for a command that must refuse before any rank starts (exit 2): were it to
    start ranks, the test fails instead."""
    from unittest import mock

    def started(*_, **__):
        raise AssertionError(f"zerotrain {' '.join(map(str, args))} started ranks; a refusal was expected")

    with mock.patch("launcher.agent.run_agent", started), mock.patch("launcher.cli._train_as_rank", started), \
            mock.patch("launcher.slurm.submit", started):
        result = in_process(*args)
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    return result


def one_line_error(result: subprocess.CompletedProcess, starts: str) -> None:
    """Exit 2 and exactly one line on stderr, naming the problem: no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"zerotrain: error: {starts}"), result.stderr[-3000:]
    assert len(lines[0]) < 400


def tiny_args(run_dir: Path, prepared: Path, *overrides: str) -> list[str]:
    """CLI arguments for a tiny run writing into run_dir."""
    sets = [f"run.output_dir={run_dir}", f"data.prepared_dir={prepared}", *overrides]
    return [str(TINY)] + [a for s in sets for a in ("--set", s)]


def endless_args(run_dir: Path, prepared: Path, *overrides: str) -> list[str]:
    """A tiny run that trains until stopped, saving and validating only if `overrides` say so."""
    return tiny_args(run_dir, prepared, "train.max_steps=100000", "checkpoint.every=0", "eval.every=0", *overrides)


MIXTURE = "[{{path: '{c}/[a-p]*_gut.txt', name: early, weight: 3}}, {{path: '{c}/[q-z]*_gut.txt', name: late, weight: 1}}]"


def as_of_step_6(run_dir: Path, copy: Path) -> Path:
    """A copy of a finished tiny run as it stood after its step-6 checkpoint: the step-12 one never happened."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000012")
    (copy / "checkpoints" / "latest").write_text("step_00000006")
    return copy


def resumed_like(resumed: Path, uninterrupted: Path, tolerance: float) -> bool:
    """Whether a run resumed from step 6 logged every step once and steps 7-12 with the uninterrupted losses."""
    expected, got = train_losses(uninterrupted), train_losses(resumed)
    after = range(7, STEPS + 1)
    return sorted(got) == list(range(1, STEPS + 1)) and \
        [got[s] for s in after] == pytest.approx([expected[s] for s in after], abs=tolerance)


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's records; a line still being written (tests poll a live run) is not one yet."""
    return read_records(run_dir / "metrics.jsonl")


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def engine_validation_loss(run: Path) -> float:
    return [r["val/loss"] for r in read_metrics(run) if "val/loss" in r][-1]


def export_validation_loss(run: Path, export) -> float:
    """The validation loss of `export` (a model, or a folder transformers loads) on the samples the tiny run's
    engine validated on (all ranks' together)."""
    from transformers import AutoModelForCausalLM

    from data_pipeline import Manifest, PackedDataset, eval_batches
    from trainer.config import load_config
    from trainer.tasks.causal_lm import lm_loss, validation_batch_counts

    cfg = load_config(run / "config.yaml")
    manifest = Manifest.load(cfg.data.prepared_dir)
    model = (export if isinstance(export, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(export)).eval()
    losses = []
    for source, count in validation_batch_counts(manifest, cfg).items():
        dataset = PackedDataset(manifest.store("validation", source), cfg.data.seq_len)
        for rank in range(cfg.layout.data_world):
            for batch in eval_batches(len(dataset), cfg.train.micro_batch_size, rank, cfg.layout.data_world, count):
                with torch.no_grad():
                    losses.append(lm_loss(model, torch.stack([dataset[i] for i in batch])).item())
    return sum(losses) / len(losses)


# Processes of runs started in the background: what the kill, signal and launch tests act on.
VICTIMS = ["rank 0", "rank 1", "every rank", "the launcher"]


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`zerotrain ARGS` in the background, as a user starts it."""
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def diverging(after: int) -> dict:
    """The environment of a run whose every process's cross-entropy turns NaN after its `after`-th
    (tests/faults/sitecustomize.py)."""
    return {**os.environ, "PYTHONPATH": str(REPO / "tests" / "faults"), "ZEROTRAIN_FAULT_NAN_AFTER": str(after)}


def slowed(seconds: float, env: dict | None = None) -> dict:
    """The environment of a run whose every cross-entropy first sleeps `seconds` (tests/faults/sitecustomize.py)."""
    return {**(env or os.environ), "PYTHONPATH": str(REPO / "tests" / "faults"),
            "ZEROTRAIN_FAULT_SLOW": str(seconds)}


def end(launcher: subprocess.Popen) -> None:
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait()


@contextmanager
def running(*args: str, env: dict | None = None):
    """`zerotrain ARGS` in the background for the block; killed (with its ranks) if still running after it."""
    launcher = start(*args, env=env)
    try:
        yield launcher
    finally:
        end(launcher)


@contextmanager
def training(args: list[str], run_dir: Path, until: int, env: dict | None = None):
    """`zerotrain train ARGS` in the background, yielded once it has logged step `until`; killed after the block
    if still running."""
    with running("train", *args, env=env) as launcher:
        wait_for(lambda: last_step(run_dir) >= until, launcher)
        yield launcher


def all_succeed(processes: list[subprocess.Popen], timeout: float = 300) -> None:
    """Wait for every process (e.g. one launcher per node) to exit 0; end the rest if one does not."""
    try:
        for process in processes:
            assert process.wait(timeout=timeout) == 0, process.communicate()
    finally:
        for process in processes:
            end(process)


def kill(victim: str, launcher: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL `victim` (one of VICTIMS) of the run that `launcher` started."""
    if victim == "the launcher":
        pids = [launcher.pid]
    elif victim == "every rank":
        pids = list(rank_pids(run_dir).values())
    else:
        pids = [rank_pid(run_dir, int(victim.removeprefix("rank ")))]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def last_step(run_dir: Path, since: float = 0) -> int:
    """The last step logged (after time `since`), 0 before any."""
    if not (run_dir / "metrics.jsonl").exists():
        return 0
    return max((r["step"] for r in read_metrics(run_dir) if "train/loss" in r and r["time"] > since), default=0)


def live_ranks(run_dir: Path, grace: float = 10) -> dict[int, int]:
    """rank_pids once they are gone, or after `grace` seconds: a SIGKILLed rank is not gone at once (exiting
    frees its memory; inside a save's fsync it dies only when the write returns)."""
    deadline = time.monotonic() + grace
    while (ranks := rank_pids(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ranks


def wait_for(condition, process: subprocess.Popen, timeout: float = 180, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def rank_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the live rank processes of this run (not their DataLoader workers), found in /proc."""
    matches = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"trainer.main" not in cmdline or str(run_dir / "config.yaml").encode() not in cmdline:
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            matches[int(proc.name)] = (int(env[b"RANK"]), parent)
        except (OSError, ValueError, KeyError, IndexError):  # a process that ended meanwhile
            continue
    return {rank: pid for pid, (rank, parent) in matches.items() if parent not in matches}


def rank_pid(run_dir: Path, rank: int) -> int:
    pids = rank_pids(run_dir)
    assert rank in pids, pids
    return pids[rank]


def ranks_seen(run_dir: Path) -> set[tuple[int, int, int]]:
    """(rank, world size, local rank) as each rank logged it."""
    seen = set()
    for log in (run_dir / "logs").glob("rank*.log"):
        match = re.search(r"rank (\d+) of (\d+) \(local rank (\d+)\)", log.read_text())
        seen.add(tuple(map(int, match.groups())))
    return seen
