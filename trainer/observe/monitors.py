"""What the loop watches while it trains, each with its own cadence-free job: the loss window and its rates,
loss spikes, the step phases, the stop request agreed by every rank, and the non-finite loss policy. `Monitors`
bundles them for the loop: one call after each step, one record per log line."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_pipeline import DataError, DataFile
from data_pipeline.files import share
from data_pipeline.record import verify_file
from trainer.config import TrainSection
from trainer.engine import Engine
from trainer.observe import compilation
from trainer.observe.perf import Throughput, memory_gib
from trainer.parallel import distributed

log = logging.getLogger("zerotrain")

EXIT_SAVED = 3  # a rank's (and the launcher's) exit code when a stop signal ended the run after a save
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, nothing saved (the shell's code for SIGINT)


class NonFiniteLoss(RuntimeError):
    pass


class Window:
    """Loss and wall time since the last log line; time spent validating, saving or compiling is left out."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.start = time.perf_counter()
        self.compiled = compilation.seconds()  # compile time so far
        self.train_seconds = 0.0  # over the whole run, the first window (start-up) excluded
        self.train_steps = 0
        self.flushes = 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def flush(self, mean: Callable[[list[float]], list[float]] = None) -> tuple[float, int, float]:
        """(mean loss over the ranks and steps of the window, steps, seconds); starts the next window."""
        mean = mean or (lambda values: distributed.all_mean(values, self.device))
        loss = mean([self.loss_sum.item() / self.steps])[0]
        compiled = compilation.seconds()
        seconds, steps = time.perf_counter() - self.start - (compiled - self.compiled), self.steps
        self.compiled = compiled
        if self.flushes:
            self.train_seconds += seconds
            self.train_steps += steps
        self.flushes += 1
        self.loss_sum.zero_()
        self.steps = 0
        self.start = time.perf_counter()
        return loss, steps, seconds

    def exclude_since_last(self) -> None:
        self.start = time.perf_counter()
        self.compiled = compilation.seconds()


class LossSpikes:
    """Logged losses far above the recent ones (6 standard deviations of an exponential moving window):
    counted and warned about, for a person to look at - training goes on."""

    def __init__(self, alpha: float = 0.1, sigmas: float = 6.0, warmup: int = 10):
        self.alpha, self.sigmas, self.warmup = alpha, sigmas, warmup
        self.mean = self.var = 0.0
        self.seen = self.spikes = 0

    def count(self, step: int, loss: float) -> int:
        """The number of spikes so far, `loss` included."""
        if self.seen >= self.warmup and loss > self.mean + self.sigmas * self.var**0.5:
            self.spikes += 1
            log.warning(f"loss spike at step {step}: {loss:.4f} against a recent {self.mean:.4f} "
                        f"+- {self.var**0.5:.4f}")
        delta = loss - self.mean if self.seen else 0.0
        self.mean = self.mean + self.alpha * delta if self.seen else loss
        self.var = (1 - self.alpha) * (self.var + self.alpha * delta**2)
        self.seen += 1
        return self.spikes


class PhaseTimer:
    """Seconds per phase of the steps since the last flush: waiting for data, forward, backward, optimizer.

    On a GPU the host runs ahead of the device, so phases are CUDA events on the stream (a gap while the
    host waits for data shows up as the data phase); on CPU the clock is the truth.
    """

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []
        self.last = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        """The phase that just ended."""
        now = self._now()
        self.marks.append((phase, self.last, now))
        self.last = now

    def restart(self) -> None:
        """Not timed since the last mark (validation, saving, logging)."""
        self.last = self._now()

    def flush(self, steps: int) -> dict[str, float]:
        """Mean seconds per step of each phase."""
        totals = dict.fromkeys(self.PHASES, 0.0)
        if self.cuda and self.marks:
            self.marks[-1][2].synchronize()
        for phase, start, end in self.marks:
            totals[phase] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self.marks.clear()
        return {f"perf/{phase}_s": seconds / steps for phase, seconds in totals.items()}


def all_ranks_max(flags: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class StopRequest:
    """SIGTERM (a scheduler's or the launcher's stop), SIGUSR1 (Slurm's warning before a time limit), SIGHUP (the
    terminal went away) or a first Ctrl-C (SIGINT): the rank finishes its step, and once every rank has been
    told, they save together and leave. A second Ctrl-C stops the rank at once, without saving. A terminal's Ctrl-C reaches every process
    of its group and a launcher may pass it on as well: SIGINTs within `same_interrupt_s` count as one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)

    def __init__(self, install: bool = True, same_interrupt_s: float = 1.0):
        self.name: str | None = None
        self.same_interrupt_s = same_interrupt_s
        self._interrupted_at: float | None = None
        if install:
            for sig in self.SIGNALS:
                signal.signal(sig, self.note)

    def note(self, signum: int, frame=None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at > self.same_interrupt_s:
                print("zerotrain: second Ctrl-C: stopping at once, without saving", file=sys.stderr, flush=True)
                os._exit(EXIT_INTERRUPTED)
            if self._interrupted_at is None:
                self._interrupted_at = now
                log.info("Ctrl-C: finishing this step, then saving and stopping (Ctrl-C again: stop at once "
                         "without saving)")
        self.name = self.name or ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)

    def agreed(self, device: torch.device, loss: torch.Tensor, corrupt: bool = False,
               reduce: Callable[[torch.Tensor], torch.Tensor] = all_ranks_max) -> tuple[bool, bool, bool]:
        """Collective, once per step: (stop now, this step's loss was not finite on some rank, some rank found a
        corrupt data file). True on every rank as soon as any rank was signalled (they must save together). The
        other checks ride along: this all-reduce is the step's one host sync."""
        flags = torch.stack([torch.tensor(float(self.name is not None), device=device),
                             (~torch.isfinite(loss)).float(), torch.tensor(float(corrupt), device=device)])
        stop, nonfinite, corrupt = (bool(flag) for flag in reduce(flags).tolist())
        if stop and self.name is None:
            self.name = "a stop signal (to another rank)"
        return stop, nonfinite, corrupt


class FileVerifier:
    """The data files' checksums, verified in the background while the run trains: this rank hashes its share
    (balanced by bytes: each file is hashed once), at the lowest CPU priority, without delaying a step.
    A failure is reported through `problem`, and the loop stops every rank with it."""

    def __init__(self, files: list[DataFile], rank: int, world_size: int):
        self.files = share(files, rank, world_size, size=lambda file: file.bytes)
        self.problem: str | None = None
        self.thread = threading.Thread(target=self._verify, name="zerotrain-verify", daemon=True)
        self.thread.start()

    def _verify(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        for file in self.files:
            try:
                verify_file(file)
            except (DataError, OSError) as e:
                self.problem = str(e)
                return
        log.info(f"verified the checksums of {len(self.files)} data file(s)")


class NonFiniteGuard:
    """The non-finite policy: a step whose loss is not finite, or whose update the optimizer skipped for
    non-finite gradients, is never saved, and after `limit` of them in a row the run stops, naming the cause."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped_in_a_row = limit, 0, 0
        self.skipped_steps = 0  # the engine's count of skipped updates after the last step

    def start(self, skipped_steps: int) -> None:
        """Before the first step of a launch: the updates the engine skipped before it (a resumed run's)."""
        self.skipped_steps = skipped_steps

    def update(self, step: int, nonfinite: bool, skipped_steps: int | None = None) -> bool:
        """Whether the step is one of them. `skipped_steps`: the engine's count of skipped updates so far (the same
        on every rank)."""
        skipped = skipped_steps is not None and skipped_steps > self.skipped_steps
        self.skipped_steps = self.skipped_steps if skipped_steps is None else skipped_steps
        bad = nonfinite or skipped
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped and not nonfinite else 0
        if nonfinite:
            log.warning(f"step {step}: the loss is not finite; no checkpoint until it is")
        elif skipped:
            log.warning(f"step {step}: the optimizer skipped the update (non-finite gradients); no checkpoint "
                        "until a step applies")
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(f"{self._cause()}, up to step {step} (train.max_nonfinite_steps); resume from an "
                                "earlier checkpoint with a lower optim.lr or longer optim.warmup_steps, or check "
                                "the data")
        return bad

    def _cause(self) -> str:
        n = self.in_a_row
        if self.skipped_in_a_row == n:
            return f"the optimizer skipped {n} update(s) in a row for non-finite gradients"
        if self.skipped_in_a_row == 0:
            return f"the loss was NaN or infinite for {n} step(s) in a row"
        return f"the loss was not finite or the update was skipped for {n} step(s) in a row"


@dataclass(frozen=True)
class Health:
    """What the ranks agreed on after a step."""

    stopping: bool  # a stop signal reached some rank: save together and leave
    nonfinite: bool  # this step's loss was not finite on some rank, or its update was skipped: not to be saved


class Monitors:
    """Everything the loop watches, behind two calls: `after_step` and, on log steps, `record`."""

    def __init__(self, t: TrainSection, device: torch.device, stop: StopRequest, throughput: Throughput,
                 verifier: FileVerifier | None = None):
        self.t, self.device, self.stop, self.throughput, self.verifier = t, device, stop, throughput, verifier
        self.window, self.phases, self.spikes = Window(device), PhaseTimer(device), LossSpikes()
        self.nonfinite = NonFiniteGuard(t.max_nonfinite_steps)
        self.last_loss: float | None = None  # the last logged loss

    def after_step(self, step: int, loss: torch.Tensor, skipped_steps: int) -> Health:
        """`skipped_steps`: the engine's count of updates it skipped so far (the same on every rank)."""
        self.window.add(loss)
        problem = self.verifier.problem if self.verifier else None
        stopping, nonfinite, corrupt = self.stop.agreed(self.device, loss, problem is not None)
        if corrupt:  # every rank stops with the file named, whichever rank found it
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
            raise DataError(next(p for p in problems if p))
        return Health(stopping, self.nonfinite.update(step, nonfinite, skipped_steps))

    def log_due(self, step: int) -> bool:
        return step == 1 or step % self.t.log_every == 0 or step == self.t.max_steps

    def record(self, step: int, engine: Engine, lr: float, tokens_seen: int) -> dict[str, float]:
        """The log line's metrics: loss since the last log, learning rate, gradient norm, health counters,
        throughput, phases and memory."""
        loss, steps, seconds = self.window.flush()
        self.last_loss = loss
        norm = engine.grad_norm
        if self.t.compile and self.window.flushes == 1:  # the first log line of this launch
            log.info(compilation.describe())
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": float("nan") if norm is None else float(norm),
                "train/loss_spikes": self.spikes.count(step, loss), "train/nonfinite_steps": self.nonfinite.in_a_row,
                # steps DeepSpeed skipped for non-finite gradients (ZeRO 1-3, and fp16 loss scaling)
                "train/skipped_steps": engine.skipped_steps, "train/tokens_seen": tokens_seen,
                **self.throughput.metrics(steps, seconds), **self.phases.flush(steps), **memory_gib(self.device),
                **(compilation.metrics() if self.t.compile else {})}

    def exclude_since_last(self) -> None:
        """Validation or a save just ran: not training time."""
        self.window.exclude_since_last()

    def stopped(self, step: int, saved: str | None) -> int:
        """The rank's exit code for a stop at `step`, said plainly."""
        if saved:
            log.warning(f"{self.stop.name} received: saved {saved}; continue with --resume auto")
            return EXIT_SAVED
        log.error(f"{self.stop.name} received at step {step}, whose loss is not finite: nothing was saved; "
                  "--resume auto continues from the last checkpoint")
        return EXIT_FAILED
