"""`zerotrain submit` against a real Slurm cluster of two nodes (real slurmctld/slurmd/munge on loopback,
tests/cluster.py), and a job spanning two hosts with their own network namespaces and addresses."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest

from cluster import NetnsHosts, SlurmCluster
from helpers import REPO, all_succeed, last_step, ranks_seen, read_metrics, tiny_args, train_losses, wait_for, zerotrain

pytestmark = pytest.mark.slow
ON_BOTH_NODES = ["--nodes", "2", "--nproc-per-node", "1", "--partition", "debug"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, requeue_delay_s=5) as running:
        yield running


def submitted(result) -> str:
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match[1]


def test_a_submitted_run_trains_across_two_nodes(cluster, tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / "job"
    job = submitted(zerotrain("submit", *tiny_args(run_dir, tiny_data), *ON_BOTH_NODES, env=cluster.env))
    info = cluster.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", (run_dir / "slurm" / f"slurm-{job}.out").read_text()[-3000:]
    assert ranks_seen(run_dir) == {(0, 2, 0), (1, 2, 0)}  # one rank per node, each its node's local rank 0
    hosts = {re.search(r"\) on (\S+),", (run_dir / "logs" / f"rank{r}.log").read_text())[1] for r in (0, 1)}
    assert hosts == {"n1", "n2"}
    assert train_losses(run_dir) == train_losses(tiny_run)
    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) == 1  # written once, by rank 0
    status = zerotrain("status", run_dir, env=cluster.env).stdout
    assert f"slurm job {job}: COMPLETED" in status


def test_a_signalled_job_saves_requeues_itself_and_finishes_like_an_uninterrupted_run(cluster, tiny_data, tmp_path):
    settings = ["train.max_steps=80", "checkpoint.every=0", "eval.every=0"]
    reference = tmp_path / "reference"
    zerotrain("train", *tiny_args(reference, tiny_data, *settings))
    run_dir = tmp_path / "preempted"
    job = submitted(zerotrain("submit", *tiny_args(run_dir, tiny_data, *settings), *ON_BOTH_NODES,
                              env=cluster.env))
    wait_for(lambda: last_step(run_dir) >= 5, _JobProbe(cluster, job), poll=0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # as Slurm does before the time limit
    info = cluster.wait(job, timeout=300)
    log = (run_dir / "slurm" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "ranks ended with code 3 (segment 0)" in log and "ranks ended with code 0 (segment 1)" in log
    assert train_losses(run_dir) == train_losses(reference)
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 81))


def test_a_failing_job_is_requeued_at_most_max_restarts_times(cluster, tiny_data, tmp_path):
    doomed_data = tmp_path / "data"
    shutil.copytree(tiny_data, doomed_data)
    run_dir = tmp_path / "crashing"
    job = submitted(zerotrain("submit", *tiny_args(run_dir, doomed_data), *ON_BOTH_NODES, "--max-restarts", "1",
                              env=cluster.env))
    shutil.rmtree(doomed_data)  # gone before the ranks look: every segment fails
    info = cluster.wait(job, timeout=300)
    log = (run_dir / "slurm" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log[-3000:]
    assert "failure 1 of at most 1: starting the next segment" in log and "data.prepared_dir" in log


def test_a_node_range_job_resumes_on_the_nodes_each_segment_is_granted(cluster, tiny_data, tmp_path):
    """--nodes 1-2: segment 0 on both nodes is preempted while n2 drains, segment 1 runs on n1 alone, n2 returns
    and segment 2 runs on both again - one global batch throughout, every step once, the losses of a run that
    was never interrupted (to the tolerance of resuming on another number of ranks)."""
    settings = ["train.max_steps=400", "checkpoint.every=0", "eval.every=0"]
    reference = tmp_path / "reference"
    zerotrain("train", *tiny_args(reference, tiny_data, *settings))
    run_dir = tmp_path / "elastic"
    cluster.wait_idle()  # Slurm grants what is free: both nodes for the first segment
    submitted(zerotrain("submit", *tiny_args(run_dir, tiny_data, *settings), "--nodes", "1-2", "--nproc-per-node",
                        "1", "--partition", "debug", env=cluster.env))
    log = run_dir / "logs" / "rank0.log"
    jobs = lambda: (run_dir / "slurm" / "jobs").read_text().split()  # noqa: E731 - every segment's job
    wait_for(lambda: last_step(run_dir) >= 5, _JobProbe(cluster, jobs()[-1]), poll=0.05)
    cluster.run("scontrol", "update", "nodename=n2", "state=drain", "reason=zerotrain-test")
    try:
        cluster.run("scancel", "--signal=USR1", "--batch", jobs()[-1])  # segment 0 saves; n2 is draining
        wait_for(lambda: len(jobs()) == 2, _JobProbe(cluster, jobs()[0]), poll=0.2)
        wait_for(lambda: "rank 0 of 1 " in log.read_text(), _JobProbe(cluster, jobs()[-1]), poll=0.2)
        resumed_at = last_step(run_dir)
        wait_for(lambda: last_step(run_dir) >= resumed_at + 3, _JobProbe(cluster, jobs()[-1]), poll=0.05)
    finally:
        cluster.run("scontrol", "update", "nodename=n2", "state=resume")
    # back in service and responding again (a resumed node is flagged not responding until slurmd answers)
    wait_for(lambda: " State=IDLE " in cluster.run("scontrol", "-o", "show", "node", "n2").stdout,
             _JobProbe(cluster, jobs()[-1]))
    cluster.run("scancel", "--signal=USR1", "--batch", jobs()[-1])  # segment 1 saves; the next gets both nodes
    wait_for(lambda: len(jobs()) == 3, _JobProbe(cluster, jobs()[1]), poll=0.2)
    info = cluster.wait(jobs()[-1], timeout=300)
    logs = "".join((run_dir / "slurm" / f"slurm-{job}.out").read_text() for job in jobs())
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert "on 1-2 node(s) (usable: n1 )" in logs and "on 2-2 node(s) (usable: n1 n2 )" in logs
    world_sizes = re.findall(r"\[rank 0\] INFO rank 0 of (\d+) ", log.read_text())
    assert world_sizes == ["2", "1", "2"], world_sizes
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 401))
    state = json.loads((run_dir / "checkpoints" / "step_00000400" / "train_state.json").read_text())
    assert state["consumed_samples"] == 400 * 16  # every sample once, at every world size
    got, expected = train_losses(run_dir), train_losses(reference)
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-4


def test_submit_refuses_a_node_range_that_cannot_keep_the_global_batch(cluster, tiny_data, tmp_path):
    result = zerotrain("submit", *tiny_args(tmp_path / "run", tiny_data), "--nodes", "1-3", "--nproc-per-node", "1",
                       env=cluster.env, check=False)
    assert result.returncode == 2 and "zerotrain: error: --nodes 1-3: a segment on 3 node(s) could not keep the " \
        "global batch (train.global_batch_size: 16 is not divisible by" in result.stderr, result.stderr


class _JobProbe:
    """Looks like a Popen to wait_for: 'exited early' once the job left the running states."""

    def __init__(self, cluster, job):
        self.cluster, self.job = cluster, job

    def poll(self):
        state = self.cluster.job(self.job)["JobState"]
        # a requeued job passes through COMPLETING (and REQUEUED) back to PENDING
        return None if state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED") else state

    def communicate(self):
        return self.cluster.job(self.job), ""


@pytest.mark.parametrize("flags,error", [
    (["--partition", "nosuch"], "--partition: 'nosuch' is not a partition of this cluster (debug)"),
    (["--nodes", "4"], "sbatch refused: allocation failure: Requested node configuration is not available"),
    (["--account", "x;rm -rf /"], "--account: 'x;rm -rf /' is not a valid Slurm value"),
])
def test_submit_refuses_bad_requests_in_one_line(flags, error, cluster, tiny_data, tmp_path):
    result = zerotrain("submit", *tiny_args(tmp_path / "run", tiny_data), *flags, env=cluster.env, check=False)
    assert result.returncode == 2 and f"zerotrain: error: {error}" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "slurm" / "jobs").exists()


def test_submit_without_a_slurm_client_says_so(tiny_data, tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # python, but no sbatch
    result = zerotrain("submit", *tiny_args(tmp_path / "run", tiny_data), env=env, check=False)
    assert result.returncode == 2 and "sbatch: not found on PATH" in result.stderr


def test_two_hosts_with_their_own_addresses_train_together(tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / "two-hosts"
    with NetnsHosts(2) as hosts:
        nodes = [hosts.popen(i, [sys.executable, "-m", "launcher.cli", "train", *tiny_args(run_dir, tiny_data),
                                 "--nproc", "1", "--nnodes", "2", "--node-rank", str(i - 1),
                                 "--master-addr", hosts.ip(1), "--master-port", "29511"],
                             env={**os.environ, "GLOO_SOCKET_IFNAME": hosts.ifname(i)}, cwd=REPO, text=True,
                             stdout=-1, stderr=-1) for i in (1, 2)]
        all_succeed(nodes)
    hosts_seen = {re.search(r"\) on (\S+),", (run_dir / "logs" / f"rank{r}.log").read_text())[1] for r in (0, 1)}
    assert hosts_seen == {"h1", "h2"}
    assert train_losses(run_dir) == train_losses(tiny_run)
