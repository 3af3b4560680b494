"""The training loop's components and helpers on their own: no process group, no DeepSpeed engine."""

from __future__ import annotations

import math
import signal
from types import SimpleNamespace

import pytest
import torch

from launcher.environment import tasks_per_node
from trainer.checkpointing.store import TrainState
from trainer.checkpointing.checkpointer import Checkpointer
from data_pipeline.errors import UserError
from trainer.config import CheckpointSection, EvalSection, TrainSection
from trainer.evaluator import Evaluator, Verdict, track_best
from trainer.observe.monitors import EXIT_FAILED, EXIT_SAVED, Health, LossSpikes, Monitors, NonFiniteGuard, NonFiniteLoss, \
    StopRequest, Window
from trainer.optim import warmup_cosine


def test_warmup_is_linear_from_the_first_step_then_cosine_to_the_floor():
    factor = warmup_cosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.1 + 0.9 * 0.5) and factor(14) == pytest.approx(0.1)
    assert factor(100) == pytest.approx(0.1)  # past max_steps (a resume that raised it) stays at the floor
    assert all(factor(s) >= factor(s + 1) for s in range(4, 20))
    assert warmup_cosine(0, 10, 0.0)(0) == 1.0


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


@pytest.mark.parametrize("metric,values,improved", [
    ("val/loss", [3.0, 2.5, 2.6, 2.4], [True, True, False, True]),
    ("val/accuracy", [0.5, 0.7, 0.7, 0.6], [True, True, False, False]),
])
def test_best_tracking_knows_which_way_is_better(metric, values, improved):
    state, seen = TrainState(), []
    for step, value in enumerate(values, 1):
        state, better = track_best(metric, TrainState(**{**state.__dict__, "step": step}), {metric: value})
        seen.append(better)
    assert seen == improved
    assert state.best_value == (min if metric == "val/loss" else max)(values)
    assert track_best(None, state, {metric: 0.0}) == (state, False)


def test_the_evaluator_stops_early_after_validations_without_improvement():
    class Scripted:
        tests = False

        def __init__(self, losses):
            self.losses = iter(losses)

        def run(self, engine):
            return {"val/loss": next(self.losses)}

    logged = []
    metrics = type("Metrics", (), {"log": lambda self, step, values: logged.append(step)})()
    evaluator = Evaluator(EvalSection(every=2, best_metric="val/loss", early_stopping=2), Scripted([3, 2, 2.5, 2.1]),
                          metrics, max_steps=100)
    state, verdicts = TrainState(), {}
    for step in range(1, 9):
        state, verdicts[step] = evaluator.after_step(None, step, TrainState(**{**state.__dict__, "step": step}))
    assert logged == [2, 4, 6, 8]
    assert [verdicts[s].improved for s in (2, 4, 6, 8)] == [True, True, False, False]
    assert [verdicts[s].early_stop for s in (2, 4, 6, 8)] == [False, False, False, True]
    assert verdicts[3] == Verdict() and state.best_step == 4


def test_the_checkpointer_saves_on_its_cadence_and_never_a_non_finite_step():
    engine = SimpleNamespace()  # the cadence never touches the engine
    saver = Checkpointer(CheckpointSection(every=5), None, engine, lambda: None, None, max_steps=12,
                         asynchronous=False, group=None)
    quiet, stop, bad = Health(False, False), Health(True, False), Health(True, True)
    assert [s for s in range(1, 13) if saver.due(s, quiet, Verdict())] == [5, 10, 12]
    assert saver.due(3, stop, Verdict()) and saver.due(3, quiet, Verdict(improved=True))
    assert saver.due(3, quiet, Verdict(early_stop=True))
    assert not saver.due(5, bad, Verdict(improved=True)) and not saver.due(12, Health(False, True), Verdict())


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


@pytest.mark.parametrize("value,counts", [("2", [2]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2)", [8, 8]),
                                          ("1,3", [1, 3])])
def test_slurm_tasks_per_node(value, counts):
    assert tasks_per_node(value) == counts


def test_unreadable_slurm_tasks_per_node_is_named():
    with pytest.raises(UserError, match=r"^SLURM_STEP_TASKS_PER_NODE: cannot read '2\(y3\)'$"):
        tasks_per_node("2(y3)")


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
