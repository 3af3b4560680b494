"""The checkpointer: when a step is saved, the save itself, the best marker and retention. The loop hands it
every step; it alone decides. Saves are asynchronous by default (checkpoint.async): the loop stands still while
the state is copied to host memory, and the files are written, fsynced, hashed and committed in the background
(trainer/checkpointing/writer.py); `wait` is where the end of the run, a stop or the next save meet the save in flight."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

from data_pipeline.files import full_disk
from trainer.checkpointing import store
from trainer.checkpointing.store import TrainState
from trainer.checkpointing.writer import Writer
from trainer.config import CheckpointSection
from trainer.engine import Engine
from trainer.evaluator import Verdict
from trainer.observe.metrics import MetricsLogger
from trainer.observe.monitors import Health
from trainer.observe.perf import memory_gib

log = logging.getLogger("zerotrain")


class Checkpointer:
    def __init__(self, section: CheckpointSection, run_dir: Path, engine: Engine,
                 stream_state: Callable[[], dict | None], metrics: MetricsLogger, max_steps: int, asynchronous: bool,
                 group):
        self.section, self.run_dir, self.engine, self.stream_state = section, run_dir, engine, stream_state
        self.metrics, self.max_steps = metrics, max_steps
        self.writer = Writer(asynchronous)
        # the writer's commit gathers the ranks' checksums from its thread, beside the loop's own collectives
        self.group = group
        self.latest: str | None = None  # the newest committed save of this run

    def due(self, step: int, health: Health, verdict: Verdict) -> bool:
        """A stop, the last step, a new best and early stopping always save; otherwise every checkpoint.every
        steps. A step whose loss is not finite never does: its weights may be damaged."""
        every = self.section.every
        return not health.nonfinite and (health.stopping or step == self.max_steps or verdict.improved
                                         or verdict.early_stop or bool(every and step % every == 0))

    def after_step(self, step: int, state: TrainState, health: Health, verdict: Verdict) -> str | None:
        """The tag whose save this step started (committed already when saves are synchronous), or None."""
        self._report(step)
        if not self.due(step, health, verdict):
            return None
        started = time.perf_counter()
        mark_best = store.mark_best if verdict.improved else lambda run_dir, tag: None
        try:
            tag = store.save(self.engine, self.run_dir, state, self.stream_state(), self.writer, self.group,
                                  (self.section.keep_last, self.section.keep_every),
                                  lambda tag: mark_best(self.run_dir, tag))
        except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
            raise _disk_full(self.run_dir, store.tag_of(step)) or e
        stall = time.perf_counter() - started  # the loop stands still meanwhile
        copied = f" (host copy {self.writer.copied_bytes / 2**20:,.1f} MiB; written in the background)" \
            if self.writer.asynchronous else ""
        log.info(f"saving {tag}: the loop stood still {stall:.2f} s{copied}")
        self.metrics.log(step, {"perf/checkpoint_s": stall, **memory_gib(self.engine.device)})
        return tag

    def wait(self, step: int) -> str | None:
        """Until the save in flight has committed; returns the newest committed tag. Raises what failed."""
        try:
            self.writer.wait()
        except (OSError, RuntimeError) as e:
            raise _disk_full(self.run_dir, "a checkpoint") or e
        self._report(step)
        return self.latest

    def _report(self, step: int) -> None:
        """Logs the saves that committed since the last step (from the loop's thread: the logger is not shared)."""
        self.writer.raise_if_failed()
        while self.writer.done:
            tag, seconds, nbytes = self.writer.done.pop(0)
            self.latest = tag.removesuffix(store.PARTIAL)
            log.info(f"saved {self.latest}: {nbytes / 2**20:,.1f} MiB written, fsynced and hashed by this rank in "
                     f"{seconds:.2f} s")
            self.metrics.log(step, {"perf/checkpoint_write_s": seconds})


def _disk_full(run_dir: Path, tag: str) -> OSError | None:
    """A save that failed on a full disk, said so: ENOSPC, the folder, and that the previous checkpoint is intact."""
    root = store.checkpoints_dir(run_dir)
    if not full_disk(root):
        return None
    previous = store.pointer(run_dir, store.LATEST)
    return OSError(errno.ENOSPC, f"no space left on the disk holding {root} while saving {tag}; the last complete "
                                 f"checkpoint ({previous or 'none'}) is intact: free space and resume with --resume auto")
