"""The trackers of `metrics.trackers` against the real things: an MLflow tracking server with a sqlite backend,
started here on loopback (from .venv-mlflow-server, which `make test` installs) as a team runs one and read back
through MlflowClient; Weights & Biases offline, its run files read back with wandb's own reader
(`wandb leet inspect --json`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import STEPS, in_process, live_ranks, one_line_error, read_metrics, refused, slowed, tiny_args, \
    train_losses, training, wait_for, zerotrain
from mlflow_server import mlflow_server

WANDB = Path(sys.executable).with_name("wandb")


def tracked_args(run_dir: Path, data: Path, uri: str, *overrides: str) -> list[str]:
    return tiny_args(run_dir, data, "metrics.trackers=[tensorboard,mlflow,wandb]",
                     f"metrics.mlflow.tracking_uri={uri}", "metrics.wandb.mode=offline", *overrides)


def wandb_records(run_dir: Path) -> dict[str, list[dict]]:
    """Each offline W&B run folder's records (one folder per launch), read by wandb's own reader."""
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    return {folder.name: [json.loads(line) for line in subprocess.run(
        [WANDB, "leet", "inspect", "--json", str(folder)], capture_output=True, text=True, check=True,
        timeout=120).stdout.splitlines()] for folder in folders}


def _history(records: list[dict]) -> dict[int, float]:
    """train/loss by step, from a W&B run file's history records."""
    return {r["history"]["step"]["num"]: r["history"]["item"]["train/loss"] for r in records
            if r["type"] == "history" and "train/loss" in r["history"]["item"]}


@pytest.mark.slow
def test_a_killed_and_resumed_run_is_one_tracker_run_with_every_step_once(tiny_data, tmp_path):
    """Killed after its step-6 save (and step 7), the run resumes from step 6: MLflow and W&B get one run each
    (rank 0's), continued by the resumed launch, every step exactly once with the run's losses, the resolved
    config, the Slurm job as a tag, and report.png and summary.json at the end. W&B offline gets what its file
    held."""
    run_dir = tmp_path / "run"
    env = slowed(0.2, {**os.environ, "SLURM_JOB_ID": "4242"})  # a step in 0.8 s: the kill comes between saves
    with mlflow_server(tmp_path / "mlflow") as (uri, _):
        args = tracked_args(run_dir, tiny_data, uri)
        with training(args, run_dir, until=7, env=env) as launcher:
            wait_for(lambda: min(_sent(run_dir, "mlflow") or 0, _sent(run_dir, "wandb") or 0) >= 7, launcher)
            launcher.kill()  # SIGKILL: the ranks die with it, past step 7 and before the step-12 save
            launcher.wait()
        assert live_ranks(run_dir) == {}
        first = json.loads((run_dir / "trackers.json").read_text())
        assert 6 < first["mlflow"]["step"] < STEPS and 6 < first["wandb"]["step"] < STEPS  # past the save
        zerotrain("train", *args, "--resume", "auto", env=env)

        record = json.loads((run_dir / "trackers.json").read_text())
        assert {name: run["run_id"] for name, run in record.items()} == \
            {name: run["run_id"] for name, run in first.items()}
        losses = train_losses(run_dir)
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("zerotrain").experiment_id])
        assert run.info.run_id == record["mlflow"]["run_id"] and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
        assert {m.step: m.value for m in history} == pytest.approx(losses, abs=1e-6)
        assert run.data.params["optim.lr"] == "0.003" and run.data.params["zero.stage"] == "2"
        assert run.data.tags["slurm.job_id"] == "4242"
        assert {"report.png", "summary.json", "config.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

        # W&B offline: one folder per launch, the same run. wandb writes its file every 15 s, so the killed launch's
        # holds what it had written (here, 3 s in: nothing); the resumed one everything after the step-6 save.
        segments = list(wandb_records(run_dir).items())
        assert len(segments) == 2 and all(name.endswith(record["wandb"]["run_id"]) for name, _ in segments)
        killed, resumed = (_history(records) for _, records in segments)
        assert set(killed) <= set(range(1, first["wandb"]["step"] + 1))
        assert resumed == pytest.approx({step: losses[step] for step in range(7, STEPS + 1)}, abs=1e-6)
        [run_record] = [r["run"] for r in segments[1][1] if r["type"] == "run"]
        assert run_record["config"]["update"]["optim"]["lr"] == 0.003 and "slurm.job_id=4242" in run_record["tags"]
        files = {f["path"] for r in segments[1][1] if r["type"] == "files" for f in r["files"]["files"]}
        assert {"report.png", "summary.json"} <= files

        status = in_process("status", run_dir).stdout
        assert f"mlflow: run {record['mlflow']['run_id']} at {uri}, sent up to step {STEPS}" in status


@pytest.mark.slow
def test_a_tracker_that_goes_away_is_warned_of_once_and_training_goes_on(tiny_data, tmp_path):
    run_dir, steps = tmp_path / "run", 40  # 16 s of steps: the server goes away once MLflow holds one
    with mlflow_server(tmp_path / "mlflow") as (uri, server):
        args = tracked_args(run_dir, tiny_data, uri, f"train.max_steps={steps}")
        with training(args, run_dir, until=1, env=slowed(0.1)) as launcher:
            wait_for(lambda: (_sent(run_dir, "mlflow") or 0) >= 1, launcher)
            os.killpg(server.pid, signal.SIGKILL)  # mid-run: the next steps' metrics have nowhere to go
            stopped = time.monotonic()
            _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-3000:]
    assert time.monotonic() - stopped < 60  # no retrying for minutes
    warnings = [line for line in (run_dir / "logs" / "rank0.log").read_text().splitlines()
                if "mlflow:" in line and "WARNING" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0], warnings
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, steps + 1))
    assert _sent(run_dir, "mlflow") < steps


def _sent(run_dir: Path, tracker: str) -> int | None:
    """The last step trackers.json says was sent to `tracker` (None before its run exists)."""
    path = run_dir / "trackers.json"
    return json.loads(path.read_text()).get(tracker, {}).get("step") if path.exists() else None
    assert (run_dir / "report.png").is_file()


def test_mlflow_without_a_server_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    one_line_error(refused("train", *tiny_args(tmp_path / "run", tmp_path / "data", "metrics.trackers=[mlflow]")),
                   "metrics.mlflow.tracking_uri: needed with the mlflow tracker")
    one_line_error(refused("train", *tiny_args(tmp_path / "run", tmp_path / "data",
                                               "metrics.trackers=[wandb,wandb]")),
                   "metrics.trackers: value error, a tracker listed twice")


class Flaky:
    """A remote tracker whose server is down while `down` is set: what `Remote` puts between it and training."""

    name, where = "flaky", "http://tracker.invalid"

    def __init__(self, holds: int | None = None):
        self.down, self.holds, self.steps, self.started = False, holds, [], []

    def start(self, run_id, config):
        self._call()
        self.started.append(run_id)
        return run_id or "run-1"

    def held(self):
        return self.holds

    def log(self, step, metrics):
        self._call()
        self.steps.append(step)

    def text(self, tag, text, step):
        self._call()

    def finish(self, artifacts, results, code):
        self._call()

    def _call(self):
        if self.down:
            raise ConnectionError("connection refused")


def test_a_remote_tracker_is_warned_of_once_retried_later_and_continued_on_resume(tmp_path, monkeypatch, caplog):
    from trainer.observe import trackers

    monkeypatch.setattr(trackers, "RETRY_AFTER", 0.3)
    tracker = Flaky()
    remote = trackers.Remote(tracker, trackers.TrackerRecord(tmp_path / "trackers.json", fresh=True))
    remote.start({})
    remote.log(1, {"train/loss": 1.0})
    wait_until(lambda: tracker.steps == [1])
    tracker.down = True
    for step in (2, 3, 4):
        remote.log(step, {"train/loss": 1.0})
    wait_until(lambda: remote.failed_at is not None)
    tracker.down = False
    time.sleep(0.4)  # past RETRY_AFTER: the next call goes through
    remote.log(5, {"train/loss": 1.0})
    remote.finish([], {}, 0)
    assert tracker.steps == [1, 5]
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == \
        ["flaky: connection refused; training goes on (metrics.jsonl has every metric; the tracker is tried again "
         "every 0.3 s)"]
    assert json.loads((tmp_path / "trackers.json").read_text())["flaky"] == \
        {"run_id": "run-1", "where": "http://tracker.invalid", "step": 5}

    # The next launch continues run-1 and skips the steps it holds; a damaged record starts a new run.
    resumed = Flaky(holds=5)
    remote = trackers.Remote(resumed, trackers.TrackerRecord(tmp_path / "trackers.json", fresh=False))
    remote.start({})
    for step in (4, 5, 6):
        remote.log(step, {"train/loss": 1.0})
    remote.finish([], {}, 0)
    assert resumed.started == ["run-1"] and resumed.steps == [6]
    (tmp_path / "trackers.json").write_text('{"flaky": {"run_id": ')
    assert trackers.TrackerRecord(tmp_path / "trackers.json", fresh=False).runs == {}
    assert "is not JSON" in caplog.records[-1].message and "the trackers start new runs" in caplog.records[-1].message


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
