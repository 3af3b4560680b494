"""The checkpointer: when a step is saved, the save itself, the best marker and retention. The loop hands it
every step; it alone decides."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from data_pipeline.files import full_disk
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.config import CheckpointSection
from trainer.evaluator import Verdict
from trainer.metrics import MetricsLogger
from trainer.monitors import Health
from trainer.perf import memory_gib

log = logging.getLogger("zerotrain")


class Checkpointer:
    def __init__(self, section: CheckpointSection, run_dir: Path, engine, stream_state: Callable[[], dict | None],
                 metrics: MetricsLogger, max_steps: int):
        self.section, self.run_dir, self.engine, self.stream_state = section, run_dir, engine, stream_state
        self.metrics, self.max_steps = metrics, max_steps

    def due(self, step: int, health: Health, verdict: Verdict) -> bool:
        """A stop, the last step, a new best and early stopping always save; otherwise every checkpoint.every
        steps. A step whose loss is not finite never does: its weights may be damaged."""
        every = self.section.every
        return not health.nonfinite and (health.stopping or step == self.max_steps or verdict.improved
                                         or verdict.early_stop or bool(every and step % every == 0))

    def after_step(self, step: int, state: TrainState, health: Health, verdict: Verdict) -> str | None:
        """The tag saved at this step, or None."""
        if not self.due(step, health, verdict):
            return None
        started = time.perf_counter()
        try:
            folder = checkpoint.save(self.engine, self.run_dir, state, self.stream_state(), self.section.keep_last,
                                     self.section.keep_every)
        except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
            raise _disk_full(self.run_dir, checkpoint.tag_of(step)) or e
        seconds = time.perf_counter() - started  # training stands still meanwhile
        log.info(f"saved {folder} in {seconds:.2f} s")
        self.metrics.log(step, {"perf/checkpoint_s": seconds, **memory_gib(self.engine.device)})
        if verdict.improved and dist.get_rank() == 0:
            checkpoint.mark_best(self.run_dir, folder.name)
        return folder.name


def _disk_full(run_dir: Path, tag: str) -> OSError | None:
    """A save that failed on a full disk, said so: ENOSPC, the folder, and that the previous checkpoint is intact."""
    root = checkpoint.checkpoints_dir(run_dir)
    if not full_disk(root):
        return None
    previous = checkpoint.pointer(run_dir, checkpoint.LATEST)
    return OSError(errno.ENOSPC, f"no space left on the disk holding {root} while saving {tag}; the last complete "
                                 f"checkpoint ({previous or 'none'}) is intact: free space and resume with --resume auto")
