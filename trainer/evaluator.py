"""The evaluator: when to validate, the best value of eval.best_metric so far, early stopping, and the final
test of the best weights (classification)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from trainer.checkpointing.store import TrainState
from trainer.config import EvalSection
from trainer.observe.metrics import MetricsLogger

log = logging.getLogger("zerotrain")

LOWER_IS_BETTER = ("val/loss", "val/ppl")


@dataclass(frozen=True)
class Verdict:
    """What a step's evaluation found."""

    results: dict[str, float] = field(default_factory=dict)  # empty when the step was not validated
    improved: bool = False  # a new best eval.best_metric: keep this step's checkpoint as the best
    early_stop: bool = False  # eval.early_stopping validations without improvement


def track_best(best_metric: str | None, state: TrainState, results: dict[str, float]) -> tuple[TrainState, bool]:
    """The state with best_metric's best value so far, and whether these results improved on it."""
    if best_metric is None:
        return state, False
    value = results[best_metric]
    lower = best_metric in LOWER_IS_BETTER
    if state.best_value is None or (value < state.best_value if lower else value > state.best_value):
        return replace(state, best_value=value, best_step=state.step, evals_since_best=0), True
    return replace(state, evals_since_best=state.evals_since_best + 1), False


class Evaluator:
    def __init__(self, section: EvalSection, validation, metrics: MetricsLogger, max_steps: int):
        self.section, self.validation, self.metrics, self.max_steps = section, validation, metrics, max_steps
        self.last: dict[str, float] = {}  # the latest validation results, for the summary

    def due(self, step: int) -> bool:
        every = self.section.every
        return self.validation is not None and (step == self.max_steps or bool(every and step % every == 0))

    def after_step(self, engine, step: int, state: TrainState) -> tuple[TrainState, Verdict]:
        if not self.due(step):
            return state, Verdict()
        self._validate(engine, step)
        state, improved = track_best(self.section.best_metric, state, self.last)
        early = bool(self.section.early_stopping) and state.evals_since_best >= self.section.early_stopping
        if early:
            log.info(f"early stopping at step {step}: {self.section.best_metric} not better than "
                     f"{state.best_value:.4f} (step {state.best_step}) in {state.evals_since_best} validations "
                     "(eval.early_stopping)")
        return state, Verdict(self.last, improved, early)

    def at_start(self, engine) -> None:
        """eval.at_start: the starting weights' results, as step 0's (before a fresh run's first step)."""
        if self.section.at_start and self.validation is not None:
            self._validate(engine, 0)

    def _validate(self, engine, step: int) -> None:
        results = self.validation.run(engine)
        self.last = {name: value for name, value in results.items() if not isinstance(value, str)}
        self.metrics.log(step, self.last)
        for name, text in results.items():  # e.g. a chat model's replies: TensorBoard text and the log
            if isinstance(text, str):
                self.metrics.text(name, text, step)
                log.info(f"step {step} {name}:\n{text}")

    def final(self, engine, state: TrainState, load_weights: Callable[[int], None]) -> dict:
        """At the end of the run: the test split's scores of the best weights (the final ones without
        eval.best_metric), where the data has a test split; `load_weights(step)` loads a saved step's weights."""
        if self.validation is None or not self.validation.tests:
            return dict(self.last)
        evaluated = state.best_step or state.step
        if evaluated != state.step:
            load_weights(evaluated)
        results, table = self.validation.test(engine)
        scalars = {name: value for name, value in results.items() if isinstance(value, float)}
        self.metrics.log(state.step, scalars)
        prefix = next(iter(results)).split("/")[0]
        self.metrics.text(f"{prefix}_confusion_matrix", table)
        log.info(f"{prefix} split, weights of step {evaluated}: " +
                 ", ".join(f"{name} {value:.4f}" for name, value in scalars.items()) + f"\n{table}")
        return {**self.last, **results, f"{prefix}/step": evaluated}
