"""Checkpoints: DeepSpeed's sharded engine state plus a small `train_state.json` per checkpoint.

Layout: RUN_DIR/checkpoints/step_00000100/{DeepSpeed shards, train_state.json, config.yaml} and
RUN_DIR/checkpoints/latest naming the newest complete one. `latest` is written by zerotrain, last,
after every rank has finished its files, so it never names a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch.distributed as dist

LATEST = "latest"


@dataclass(frozen=True)
class TrainState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0  # global, world-size independent position in the data order
    tokens_seen: int = 0
    data_fingerprint: str = ""

    def advanced(self, samples: int, tokens: int) -> "TrainState":
        return replace(self, step=self.step + 1, consumed_samples=self.consumed_samples + samples,
                       tokens_seen=self.tokens_seen + tokens)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_tag(run_dir: Path) -> str | None:
    pointer = checkpoints_dir(run_dir) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def read_state(run_dir: Path, tag: str) -> TrainState:
    return TrainState(**json.loads((checkpoints_dir(run_dir) / tag / "train_state.json").read_text()))


def save(engine, run_dir: Path, state: TrainState, rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. `rank_state`: this rank's own data position (streaming mode).
    Returns the checkpoint folder."""
    root = checkpoints_dir(run_dir)
    tag = f"step_{state.step:08d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    if rank_state is not None:
        _write_atomic(root / tag / f"data_state_rank{dist.get_rank()}.json", json.dumps(rank_state))
    dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if dist.get_rank() == 0:
        _write_atomic(root / tag / "train_state.json", json.dumps(asdict(state), indent=2))
        shutil.copyfile(run_dir / "config.yaml", root / tag / "config.yaml")
        _write_atomic(root / LATEST, tag)
    dist.barrier()
    return root / tag


def load(engine, run_dir: Path) -> TrainState | None:
    """Restore the engine from the newest checkpoint; None when the run has none yet."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    engine.load_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    return read_state(run_dir, tag)


def read_rank_state(run_dir: Path, rank: int) -> dict:
    tag = latest_tag(run_dir)
    return json.loads((checkpoints_dir(run_dir) / tag / f"data_state_rank{rank}.json").read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
