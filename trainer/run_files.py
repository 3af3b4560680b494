"""The JSON files of a run directory, each read through one pydantic schema, as the config is: a damaged file is
named in one line (a UserError) - or tolerated, where the reader can go on without it - never a traceback.

checkpoints/step_N/manifest.json (every file of a checkpoint: bytes, sha256), checkpoints/step_N/train_state.json
(trainer.checkpointing.store.TrainState), metrics.jsonl (one record per logged step), summary.json (where a
finished run ended), trackers.json (each remote tracker's run: trainer/observe/trackers.py), slurm/jobs (the job
ids of a submitted run, one per line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, TypeAdapter, ValidationError, model_validator

from data_pipeline.errors import UserError

T = TypeVar("T")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(RootModel[dict[str, FileEntry]]):
    """A checkpoint's files by their path within its folder."""


class MetricsRecord(BaseModel):
    """One logged step: its number, when, and its metrics (numbers; NaN where a value was not finite)."""

    model_config = ConfigDict(extra="allow")

    step: int = Field(ge=0, strict=True)
    time: float | None = None

    @model_validator(mode="after")
    def _numbers(self):
        for name, value in self.model_extra.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} is not a number")
        return self

    def metrics(self) -> dict[str, float]:
        return dict(self.model_extra)


class Summary(BaseModel):
    """summary.json: what a finished run reached; the task's results (val_loss, test_accuracy...) beside."""

    model_config = ConfigDict(extra="allow")

    step: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    final_loss: float | None = None
    best_checkpoint: str | None = None
    tokens_per_s: float | None = Field(None, ge=0)
    checkpoint: str | None = None
    tensorboard: str | None = None


class TrackerRun(BaseModel):
    """A remote tracker's run (MLflow, W&B) that a resumed run continues."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(min_length=1)
    where: str  # its server or project: a run configured for another starts a new tracker run
    step: int | None = Field(None, ge=0)  # the last step sent to it


class TrackerRuns(RootModel[dict[str, TrackerRun]]):
    """trackers.json: the runs by tracker name."""


def parse(text: str, schema: type[T], where: Path | str) -> T:
    """`text` (JSON) as `schema`; a one-line UserError naming `where` and the first problem otherwise."""
    try:
        data = json.loads(text)  # NaN and Infinity included: how Python writes a value that is not finite
    except ValueError as e:
        raise UserError(f"{where} is not JSON ({getattr(e, 'msg', e)}); the file is damaged") from None
    try:
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{where} is not a {WHAT.get(schema.__name__, schema.__name__)} ({at + ': ' if at else ''}"
                        f"{first['msg']}); the file is damaged") from None


def read(path: Path, schema: type[T]) -> T:
    """The file at `path` as `schema`; one line naming it when it is missing, unreadable or damaged."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    return parse(text, schema, path)


def job_ids(path: Path) -> list[str]:
    """The job ids in slurm/jobs (whitespace-separated digits); none when the file is missing or empty."""
    if not path.is_file():
        return []
    ids = path.read_text(errors="replace").split()
    damaged = [job for job in ids if not job.isdigit()]
    if damaged:
        raise UserError(f"{path}: damaged (not a job id: {damaged[0][:40]!r})")
    return ids


# what the file is, in a user's words, by its schema's name
WHAT = {"Manifest": "checkpoint manifest", "MetricsRecord": "metrics record", "Summary": "run summary",
        "TrainState": "checkpoint's train state",
        "TrackerRuns": "record of tracker runs"}
