"""The global sample order (data_pipeline/sampler.py): world-size independent, exactly once over resumes,
the mixture's weights realised."""


import collections

import numpy as np
import pytest

from data_pipeline import GlobalBatchSampler, GlobalOrder, eval_batches


def steps_at(world_size, num_steps, *, sizes=(50,), weights=(1.0,), global_batch=12, micro_batch=2, seed=7,
             consumed=0):
    """Per optimizer step, the sorted union of the samples every rank draws."""
    per_rank = global_batch // world_size // micro_batch
    order = GlobalOrder(list(sizes), list(weights), seed)
    ranks = [iter(GlobalBatchSampler(order, global_batch, micro_batch, r, world_size, consumed))
             for r in range(world_size)]
    return [sorted(i for it in ranks for _ in range(per_rank) for i in next(it)) for _ in range(num_steps)]


def test_sampler_is_world_size_independent():
    reference = steps_at(1, 10)
    assert steps_at(2, 10) == reference and steps_at(3, 10) == reference


def test_sampler_covers_each_epoch_once():
    sampler = iter(GlobalBatchSampler(GlobalOrder([50], [1.0], seed=7), 12, 2, 0, 1))
    flat = [i for _ in range(60) for i in next(sampler)]  # 120 positions: epochs 0, 1 and part of 2
    epoch0, epoch1 = flat[:50], flat[50:100]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1  # a fresh permutation per epoch
    other_seed = iter(GlobalBatchSampler(GlobalOrder([50], [1.0], seed=8), 12, 2, 0, 1))
    assert flat != [i for _ in range(60) for i in next(other_seed)]


def test_sampler_resumes_exactly_at_another_world_size():
    uninterrupted = steps_at(2, 10)
    assert steps_at(3, 6, consumed=4 * 12) == uninterrupted[4:]  # step 4 crosses into epoch 1


def test_sampler_rejects_bad_arguments():
    order = GlobalOrder([50], [1.0], seed=0)
    with pytest.raises(ValueError, match="global_batch_size: 10"):
        GlobalBatchSampler(order, 10, 2, 0, 3)
    with pytest.raises(ValueError, match="consumed_samples: 6"):
        GlobalBatchSampler(order, 12, 2, 0, 2, consumed_samples=6)
    with pytest.raises(ValueError, match="weights"):
        GlobalOrder([50, 10], [1.0], seed=0)


def test_eval_batches_same_set_at_any_world_size():
    def union(world_size, max_batches):
        return sorted(b for r in range(world_size) for b in eval_batches(23, 2, r, world_size, max_batches))

    all_batches = [[2 * b, 2 * b + 1] for b in range(11)]  # sample 22 is the incomplete last batch: dropped
    assert union(1, 100) == union(2, 100) == union(3, 100) == all_batches
    assert union(1, 4) == union(3, 4) == all_batches[:4]
    assert eval_batches(23, 2, 1, 3, 100) == [all_batches[b] for b in (1, 4, 7, 10)]


def test_mixture_realises_the_weights():
    sizes, weights = [100, 30, 7], [6.0, 3.0, 1.0]
    order = GlobalOrder(sizes, weights, seed=1)
    offsets = np.cumsum([0, *sizes[:-1]])
    positions = 10 * 4096 + 123
    source_of = np.searchsorted(offsets, [order.sample(k) for k in range(positions)], side="right") - 1
    realised = np.bincount(source_of, minlength=3)
    assert realised.tolist() == order.counts(positions).tolist()
    assert np.allclose(realised / positions, np.array(weights) / 10, atol=2 / 4096)
    # Within each source, every epoch uses each of its samples exactly once (the small ones upsampled).
    for s, size in enumerate(sizes):
        drawn = [order.sample(k) - offsets[s] for k in range(positions) if source_of[k] == s]
        for epoch in range(len(drawn) // size):
            assert sorted(drawn[epoch * size:(epoch + 1) * size]) == list(range(size))


def test_exactly_once_across_resumes_on_2_then_1_then_3_ranks():
    for kw in (dict(sizes=(50,), weights=(1.0,)), dict(sizes=(30, 20), weights=(2.0, 1.0))):
        uninterrupted = steps_at(1, 10, **kw)
        resumed = steps_at(2, 3, **kw) + steps_at(1, 2, consumed=3 * 12, **kw) + steps_at(3, 5, consumed=5 * 12, **kw)
        assert resumed == uninterrupted
    # 120 positions over 50 samples: two whole epochs (each sample twice) and 20 samples of the third.
    uses = collections.Counter(i for step in resumed_single() for i in step)
    assert sorted(uses) == list(range(50))
    assert sorted(collections.Counter(uses.values()).items()) == [(2, 30), (3, 20)]


def resumed_single():
    return steps_at(2, 3) + steps_at(1, 2, consumed=3 * 12) + steps_at(3, 5, consumed=5 * 12)


def test_order_is_deterministic_per_seed():
    assert steps_at(2, 5, seed=3) == steps_at(2, 5, seed=3)
    assert steps_at(2, 5, seed=3) != steps_at(2, 5, seed=4)
