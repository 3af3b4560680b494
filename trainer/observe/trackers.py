"""The trackers a run's metrics go to besides metrics.jsonl and the console (`metrics.trackers`): TensorBoard
(torch's SummaryWriter, RUN_DIR/tensorboard), MLflow (mlflow's MlflowClient, to a tracking server) and Weights &
Biases (wandb, online or offline under RUN_DIR/wandb). Only rank 0 has any (trainer/observe/metrics.py).

Each tracker is started with the resolved config, logs a step's metrics and texts, and finishes with the run's
artifacts (report.png, summary.json), the final results and how the launch ended. MLflow and W&B are `Remote`:
their calls run on a thread of their own, so training never waits for a network; one that cannot be reached is
warned of once and training goes on. RUN_DIR/trackers.json keeps each one's run id and the last step sent to
it: a resumed run continues the same tracker run, and does not send again the steps the tracker holds already
(a killed launch sent them after its last save; the resumed one computes them anew, to the same values).
"""

from __future__ import annotations

import html
import logging
import os
import queue
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Protocol

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from data_pipeline.errors import UserError
from data_pipeline.files import write_durable
from trainer import run_files
from trainer.config import MetricsSection, MlflowSection, WandbSection, dotted
from trainer.observe.monitors import EXIT_FAILED, EXIT_SAVED

log = logging.getLogger("zerotrain")

RECORD = "trackers.json"
FINISH_TIMEOUT = 60  # seconds a remote tracker gets to send what is left when the launch ends
RETRY_AFTER = 60  # seconds a remote tracker whose call failed is left alone
# environment variables of the Slurm job a launch runs in, and the tag each becomes
SLURM_TAGS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_JOB_NAME": "slurm.job_name",
              "SLURM_CLUSTER_NAME": "slurm.cluster", "SLURM_JOB_NUM_NODES": "slurm.nodes",
              "SLURM_RESTART_COUNT": "slurm.restart_count"}


class Tracker(Protocol):
    name: str

    def start(self, config: dict) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def text(self, tag: str, text: str, step: int | None) -> None: ...

    def finish(self, artifacts: list[Path], results: dict[str, float], code: int) -> None: ...


def trackers(section: MetricsSection, run_dir: Path, run_name: str, start_step: int) -> list[Tracker]:
    """The trackers `section` lists, ready to start. `start_step`: the step this launch continues from."""
    record = TrackerRecord(run_dir / RECORD, fresh=start_step == 0)
    tags = job_tags(run_dir)
    made = {"tensorboard": lambda: TensorBoard(run_dir, start_step),
            "mlflow": lambda: Remote(Mlflow(section.mlflow, run_name, tags), record),
            "wandb": lambda: Remote(Wandb(section.wandb, run_dir, run_name, tags), record)}
    return [made[name]() for name in section.trackers]


def job_tags(run_dir: Path) -> dict[str, str]:
    """What a team filters runs by: the Slurm job the launch runs in (if any), the host and the run directory."""
    return {"zerotrain.run_dir": str(run_dir.resolve()), "zerotrain.host": socket.gethostname(),
            **{tag: os.environ[name] for name, tag in SLURM_TAGS.items() if os.environ.get(name)}}


class TensorBoard:
    """Scalars, texts, and the run's settings beside its final results in the HPARAMS tab (comparing runs)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int):
        # purge_step: a resumed run logs again the steps an interrupted launch logged after its last save
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.config: dict = {}

    def start(self, config: dict) -> None:
        self.config = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                       for key, value in dotted(config).items()}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int | None) -> None:
        self.writer.add_text(tag, f"```\n{text}\n```", global_step=step)

    def finish(self, artifacts: list[Path], results: dict[str, float], code: int) -> None:
        if results:  # into the run's own event file: SummaryWriter.add_hparams would start another run folder
            for summary in hparams(self.config, results):
                self.writer.file_writer.add_summary(summary)
        self.writer.close()


class TrackerRecord:
    """RUN_DIR/trackers.json: each remote tracker's run id, where it lives, and the last step sent to it."""

    def __init__(self, path: Path, fresh: bool):
        self.path, self.lock = path, threading.Lock()
        self.runs: dict[str, run_files.TrackerRun] = {} if fresh else self._read()

    def run(self, name: str, where: str) -> run_files.TrackerRun | None:
        """The tracker run a previous launch began, if it is at the same server/project."""
        run = self.runs.get(name)
        return run if run and run.where == where else None

    def update(self, name: str, **fields) -> None:
        with self.lock:  # each remote tracker's thread writes its own entry
            old = self.runs.get(name)
            self.runs[name] = old.model_copy(update=fields) if old else run_files.TrackerRun(**fields)
            write_durable(self.path, run_files.TrackerRuns(self.runs).model_dump_json(indent=1))

    def _read(self) -> dict[str, run_files.TrackerRun]:
        if not self.path.is_file():
            return {}
        try:
            return run_files.read(self.path, run_files.TrackerRuns).root
        except UserError as e:  # the trackers start new runs; training needs none of them
            log.warning(f"{e}; the trackers start new runs")
            return {}


class Remote:
    """A tracker over the network: its calls run in order on a thread of their own, so training never waits for
    it. A call that fails is warned of (the first time only) and training goes on; the calls of the next
    RETRY_AFTER seconds are dropped, then the tracker is tried again (a server restarted mid-run gets the later
    steps). The tracker run starts with the first call that succeeds, continuing an earlier launch's run of
    this training run, whose steps it skips."""

    def __init__(self, tracker, record: TrackerRecord):
        self.tracker, self.record, self.name = tracker, record, tracker.name
        self.resumed = record.run(self.name, tracker.where)
        self.config: dict | None = None  # the resolved config, once `start` gave it; None again once started
        self.held = -1  # the last step the tracker run holds, as its start found
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.failed_at: float | None = None  # when the last call failed, while failing
        self.dropped, self.warned = 0, False
        self.thread = threading.Thread(target=self._serve, name=f"zerotrain-{self.name}", daemon=True)
        self.thread.start()

    def start(self, config: dict) -> None:
        self.config = config
        self.calls.put(lambda: None)  # started by the first call

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.put(lambda: self._log(step, metrics))

    def text(self, tag: str, text: str, step: int | None) -> None:
        self.calls.put(lambda: self._text(tag, text, step))

    def finish(self, artifacts: list[Path], results: dict[str, float], code: int) -> None:
        self.calls.put(lambda: self.tracker.finish(artifacts, results, code))
        self.calls.put(None)
        self.thread.join(FINISH_TIMEOUT)
        if self.thread.is_alive():
            log.warning(f"{self.name}: still sending after {FINISH_TIMEOUT} s; left behind (metrics.jsonl has "
                        "every metric)")

    def _serve(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.failed_at is not None and time.monotonic() - self.failed_at < RETRY_AFTER:
                self.dropped += 1
                continue
            try:
                if self.config is not None:
                    self._start(self.config)
                call()
            except Exception as e:  # noqa: BLE001 - whatever a tracker's client raises, training goes on
                self._failed(e)
            else:
                if self.failed_at is not None:
                    log.info(f"{self.name}: reachable again ({self.dropped} calls were dropped meanwhile)")
                    self.failed_at, self.dropped = None, 0

    def _start(self, config: dict) -> None:
        run_id = self.tracker.start(self.resumed.run_id if self.resumed else None, config)
        self.config = None
        if self.resumed:
            held = self.tracker.held()
            self.held = -1 if held is None else held
            log.info(f"{self.name}: continuing run {run_id}" + (f", which holds steps up to {held}" if held else ""))
        else:
            self.record.update(self.name, run_id=run_id, where=self.tracker.where, step=None)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.held:
            self.tracker.log(step, metrics)
            self.record.update(self.name, step=step)

    def _text(self, tag: str, text: str, step: int | None) -> None:
        if step is None or step > self.held:
            self.tracker.text(tag, text, step)

    def _failed(self, error: Exception) -> None:
        self.failed_at, self.dropped = time.monotonic(), self.dropped + 1
        if not self.warned:
            self.warned = True
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            first = first if len(first) <= 160 else f"{first[:160]}..."
            log.warning(f"{self.name}: {first}; training goes on (metrics.jsonl has every metric; the tracker is "
                        f"tried again every {RETRY_AFTER} s)")


# How a launch ended, in each tracker's words: stopped by a signal after a save (it may continue), or failed.
MLFLOW_STATUS = {0: "FINISHED", EXIT_SAVED: "KILLED", EXIT_FAILED: "FAILED"}


class Mlflow:
    """An MLflow run through MlflowClient: params are the resolved config's keys; texts and artifacts files."""

    name = "mlflow"

    def __init__(self, section: MlflowSection, run_name: str, tags: dict[str, str]):
        from mlflow.tracking import MlflowClient

        self.where = section.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]  # the config check made sure
        # MLflow's client retries a failed request 7 times over about 4 minutes, which would hold the end of a
        # launch whose server is gone that long: 3 times (14 s) unless the environment says otherwise
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client, self.experiment, self.run_name, self.tags = MlflowClient(self.where), section.experiment, \
            run_name, tags
        self.run_id = ""

    def start(self, run_id: str | None, config: dict) -> str:
        from mlflow.entities import Param, RunTag

        params = {key: str(value) for key, value in dotted(config).items()}
        run_id = run_id or self.run_id  # an earlier try created the run, then failed
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            held = self.client.get_run(run_id).data.params
            changed = {key: value for key, value in params.items() if key in held and held[key] != value}
            params = {key: value for key, value in params.items() if key not in held}
            if changed:  # an MLflow param never changes: a resumed run's new values become tags
                self.tags = {**self.tags, **{f"resumed.{key}": value for key, value in changed.items()}}
        else:
            self.run_id = self.client.create_run(self._experiment_id(), run_name=self.run_name).info.run_id
        items = [Param(key, value[:6000]) for key, value in params.items()]  # MLflow's limit on a value
        for first in range(0, len(items), 100):  # and on params per call
            self.client.log_batch(self.run_id, params=items[first:first + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in self.tags.items()])
        return self.run_id

    def held(self) -> int | None:
        """The last step the run holds, as the server says (trackers.json can lag it by the one call a kill
        interrupted before it was noted). Every logged step has a train/loss."""
        return max((metric.step for metric in self.client.get_metric_history(self.run_id, "train/loss")),
                   default=None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in metrics.items()])

    def text(self, tag: str, text: str, step: int | None) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt" if step is None else f"{tag}/step_{step}.txt")

    def finish(self, artifacts: list[Path], results: dict[str, float], code: int) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(code, "FAILED"))

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # created meanwhile by another run
            return self.client.get_experiment_by_name(self.experiment).experiment_id


class Wandb:
    """A W&B run through wandb.init: the resolved config, metrics by step, texts and artifacts as run files."""

    name = "wandb"

    def __init__(self, section: WandbSection, run_dir: Path, run_name: str, tags: dict[str, str]):
        self.section, self.run_dir, self.run_name = section, run_dir, run_name
        self.where = f"{section.entity}/{section.project}" if section.entity else section.project
        # W&B tags are short labels: the Slurm job's
        self.tags = [f"{key}={value}"[:64] for key, value in tags.items() if key.startswith("slurm.")]
        self.run = None

    def start(self, run_id: str | None, config: dict) -> str:
        import wandb

        s = self.section
        self.run = wandb.init(project=s.project, entity=s.entity, mode=s.mode, dir=self.run_dir,
                              id=run_id, resume="allow", name=self.run_name,
                              config=config, allow_val_change=True, tags=self.tags,
                              settings=wandb.Settings(console="off", silent=True))
        return self.run.id

    def held(self) -> int | None:
        """The last step the run holds, as wandb.init found it: online, the server's. Offline nothing is known
        (wandb writes its file every 15 s: a killed launch loses what it had not written), so the steps after
        the checkpoint are sent again (W&B ignores a step below the last one a run holds)."""
        return self.run.starting_step - 1 if self.run.starting_step else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def text(self, tag: str, text: str, step: int | None) -> None:
        if step is None:  # the run's versions and data: facts of the run, not of a step
            self.run.summary[tag] = text
        else:
            import wandb

            self.run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def finish(self, artifacts: list[Path], results: dict[str, float], code: int) -> None:
        for path in artifacts:  # copied into the W&B run's folder: saved from there, wandb links nothing outside
            self.run.save(shutil.copy(path, self.run.dir), base_path=self.run.dir, policy="now")
        self.run.summary.update(results)
        self.run.finish(exit_code=code)
