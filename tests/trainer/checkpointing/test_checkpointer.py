"""The checkpointer's cadence (trainer/checkpointing/checkpointer.py), without an engine."""

from __future__ import annotations

from types import SimpleNamespace

from trainer.checkpointing.checkpointer import Checkpointer
from trainer.config import CheckpointSection
from trainer.evaluator import Verdict
from trainer.observe.monitors import Health


def test_the_checkpointer_saves_on_its_cadence_and_never_a_non_finite_step():
    engine = SimpleNamespace()  # the cadence never touches the engine
    saver = Checkpointer(CheckpointSection(every=5), None, engine, lambda: None, None, max_steps=12,
                         asynchronous=False, group=None)
    quiet, stop, bad = Health(False, False), Health(True, False), Health(True, True)
    assert [s for s in range(1, 13) if saver.due(s, quiet, Verdict())] == [5, 10, 12]
    assert saver.due(3, stop, Verdict()) and saver.due(3, quiet, Verdict(improved=True))
    assert saver.due(3, quiet, Verdict(early_stop=True))
    assert not saver.due(5, bad, Verdict(improved=True)) and not saver.due(12, Health(False, True), Verdict())
