"""What the loop watches (trainer/observe/monitors.py), on its own: no process group, no engine."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from trainer.config import TrainSection
from trainer.observe.monitors import (
    EXIT_FAILED, EXIT_SAVED, LossSpikes, Monitors, NonFiniteGuard, NonFiniteLoss, StopRequest, Window
)
from trainer.optim import warmup_cosine


def test_loss_spikes_are_counted_after_warmup_only():
    spikes = LossSpikes(warmup=5)
    counts = [spikes.count(step, 2.0 + 0.01 * (step % 2)) for step in range(1, 11)]
    assert counts[-1] == 0
    assert spikes.count(11, 9.0) == 1 and spikes.count(12, 2.0) == 1
    early = LossSpikes(warmup=5)
    assert early.count(1, 2.0) == 0 and early.count(2, 50.0) == 0  # no history yet: not a spike


def test_window_means_its_steps_and_leaves_out_excluded_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("trainer.observe.monitors.time.perf_counter", lambda: now[0])
    window = Window(torch.device("cpu"))
    window.add(torch.tensor(2.0))
    window.add(torch.tensor(4.0))
    now[0] += 6
    assert window.flush(mean=lambda values: values) == (3.0, 2, 6.0)
    assert window.train_steps == 0  # the first window holds the start-up: not training time
    now[0] += 50
    window.exclude_since_last()  # a validation ran
    window.add(torch.tensor(1.0))
    now[0] += 2
    assert window.flush(mean=lambda values: values) == (1.0, 1, 2.0)
    assert (window.train_steps, window.train_seconds) == (1, 2.0)


def test_a_stop_signal_to_one_rank_stops_every_rank():
    signalled, other = StopRequest(install=False), StopRequest(install=False)
    signalled.note(signal.SIGUSR1)
    reduce_for_other = lambda mine: torch.stack([mine, torch.tensor([1.0, 0.0, 0.0])]).max(0).values  # noqa: E731
    assert other.agreed(torch.device("cpu"), torch.tensor(2.0), reduce=reduce_for_other) == (True, False, False)
    assert other.name == "a stop signal (to another rank)" and signalled.name == "SIGUSR1"
    quiet = StopRequest(install=False)
    assert quiet.agreed(torch.device("cpu"), torch.tensor(float("nan")), True, lambda flags: flags) == \
        (False, True, True)


def test_a_first_ctrl_c_asks_for_a_save_and_a_second_stops_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr("trainer.observe.monitors.os._exit", exits.append)
    clock = [0.0]
    monkeypatch.setattr("trainer.observe.monitors.time.monotonic", lambda: clock[0])
    stop = StopRequest(install=False)
    stop.note(signal.SIGINT)
    assert stop.name == "Ctrl-C" and not exits
    clock[0] += 0.2
    stop.note(signal.SIGINT)  # the same Ctrl-C, passed on by a launcher as well
    assert not exits
    clock[0] += 5
    stop.note(signal.SIGINT)
    assert exits == [130]


def test_non_finite_losses_stop_the_run_after_the_limit_in_a_row():
    guard = NonFiniteGuard(limit=3)
    for step, bad in enumerate([True, True, False, True, True], 1):
        guard.update(step, bad)
    with pytest.raises(NonFiniteLoss, match=r"for 3 step\(s\) in a row, up to step 6 \(train.max_nonfinite_steps\)"):
        guard.update(6, True)


def test_a_stop_on_a_non_finite_step_says_nothing_was_saved(caplog):
    monitors = Monitors(TrainSection(micro_batch_size=1, global_batch_size=1, max_steps=9), torch.device("cpu"),
                        StopRequest(install=False), throughput=None)
    monitors.stop.note(signal.SIGTERM)
    assert monitors.stopped(4, saved=None) == EXIT_FAILED
    assert "whose loss is not finite: nothing was saved" in caplog.text and "saved step" not in caplog.text
    assert monitors.stopped(4, saved="step_00000004") == EXIT_SAVED


def test_log_cadence():
    monitors = Monitors(TrainSection(micro_batch_size=1, global_batch_size=1, max_steps=25, log_every=10),
                        torch.device("cpu"), StopRequest(install=False), throughput=None)
    assert [s for s in range(1, 26) if monitors.log_due(s)] == [1, 10, 20, 25]
    assert math.isclose(warmup_cosine(0, 1, 0.5)(1), 0.5)


def test_updates_the_optimizer_skips_in_a_row_stop_the_run_and_are_never_saved():
    """What DeepSpeed does with non-finite gradients under bf16 or fp16 ZeRO: it skips the update and goes on.
    Steps whose update is skipped count as non-finite ones: not saved, and the run stops after the limit."""
    guard = NonFiniteGuard(limit=3)
    guard.start(skipped_steps=5)  # a resumed run: the updates skipped before this launch are not this step's
    assert [guard.update(step, False, skipped) for step, skipped in ((1, 5), (2, 6), (3, 7))] == [False, True, True]
    with pytest.raises(NonFiniteLoss, match=r"^the optimizer skipped 3 update\(s\) in a row for non-finite gradients"):
        guard.update(4, False, 8)
    mixed = NonFiniteGuard(limit=2)
    mixed.update(1, nonfinite=True, skipped_steps=0)
    with pytest.raises(NonFiniteLoss, match=r"^the loss was not finite or the update was skipped for 2 step"):
        mixed.update(2, nonfinite=False, skipped_steps=1)
