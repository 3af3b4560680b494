"""The place a scheduler gave a process among the ranks (launcher/environment.py)."""

from __future__ import annotations

import pytest

from data_pipeline.errors import UserError
from launcher.environment import tasks_per_node


@pytest.mark.parametrize("value,counts", [("2", [2]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2)", [8, 8]),
                                          ("1,3", [1, 3])])
def test_slurm_tasks_per_node(value, counts):
    assert tasks_per_node(value) == counts


def test_unreadable_slurm_tasks_per_node_is_named():
    with pytest.raises(UserError, match=r"^SLURM_STEP_TASKS_PER_NODE: cannot read '2\(y3\)'$"):
        tasks_per_node("2(y3)")
