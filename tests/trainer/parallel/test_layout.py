"""The parallel layout (trainer/parallel/layout.py)."""

from __future__ import annotations

from helpers import TINY
from trainer.config import load_config


def test_the_parallel_layout_says_who_shares_a_sample():
    from trainer.parallel.layout import ParallelLayout

    layout = load_config(TINY, ["launch.nproc_per_node=4", "parallel.sequence=2"]).layout
    assert (layout.world, layout.data_world, layout.zero_world, layout.model_parallel) == (4, 2, 4, 2)
    assert [layout.data_rank(r) for r in range(4)] == [0, 0, 1, 1] and layout.groups() == [[0, 1], [2, 3]]
    assert layout.grad_accum(16, 4) == 2 and layout.deepspeed_batch(16) == 32
    tensor = ParallelLayout(4, tensor=2)
    assert tensor.zero_world == 2 and not tensor.same_files(layout) and layout.same_files(ParallelLayout(4))
    assert ParallelLayout.from_dict(layout.to_dict()) == layout and str(layout) == "4 ranks, parallel.sequence 2"
