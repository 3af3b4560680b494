"""The optimizer's parameter groups and learning-rate schedule (trainer/optim.py)."""

from __future__ import annotations

import pytest

from trainer.optim import warmup_cosine


def test_warmup_is_linear_from_the_first_step_then_cosine_to_the_floor():
    factor = warmup_cosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.1 + 0.9 * 0.5) and factor(14) == pytest.approx(0.1)
    assert factor(100) == pytest.approx(0.1)  # past max_steps (a resume that raised it) stays at the floor
    assert all(factor(s) >= factor(s + 1) for s in range(4, 20))
    assert warmup_cosine(0, 10, 0.0)(0) == 1.0
