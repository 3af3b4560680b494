"""The evaluator (trainer/evaluator.py): best tracking and early stopping."""

from __future__ import annotations

import pytest

from trainer.checkpointing.store import TrainState
from trainer.config import EvalSection
from trainer.evaluator import Evaluator, Verdict, track_best


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
