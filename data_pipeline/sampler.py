"""Which samples each rank trains on, in an order defined for the whole job rather than per rank.

Global position k (0, 1, 2, ...) is sample perm_e[k % num_samples] of epoch e = k // num_samples. Optimizer
step s consumes positions [s*G, (s+1)*G), split into contiguous equal slices by rank. So the samples of a step
do not depend on the world size, and resuming after s steps at any world size continues exactly where it stopped.
"""
from collections.abc import Iterator

import numpy as np


class GlobalBatchSampler:
    """A DataLoader `batch_sampler`: yields this rank's micro-batches (lists of indices), forever."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, consumed_samples: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples: {num_samples}, need at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} outside [0, world_size={world_size})")
        if global_batch_size < 1 or global_batch_size % (world_size * micro_batch_size):
            raise ValueError(
                f"global_batch_size: {global_batch_size} is not a multiple of "
                f"world_size * micro_batch_size = {world_size} * {micro_batch_size}"
            )
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise ValueError(
                f"consumed_samples: {consumed_samples} is not a multiple of global_batch_size {global_batch_size}"
            )
        self.num_samples, self.seed = num_samples, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.consumed_samples = consumed_samples
        self._epoch, self._perm = -1, None  # only the current epoch's permutation is kept

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.world_size
        step_start = self.consumed_samples
        while True:
            rank_start = step_start + self.rank * per_rank
            for mb_start in range(rank_start, rank_start + per_rank, self.micro_batch_size):
                yield [self._sample(k) for k in range(mb_start, mb_start + self.micro_batch_size)]
            step_start += self.global_batch_size

    def _sample(self, position: int) -> int:
        epoch, i = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[i])


def eval_batches(num_samples: int, micro_batch_size: int, rank: int, world_size: int,
                 max_batches: int) -> list[list[int]]:
    """The first max_batches sequential micro-batches of the split (the incomplete last one dropped), dealt
    round-robin to ranks: the same batches are evaluated at any world size."""
    num_batches = min(num_samples // micro_batch_size, max_batches)
    return [list(range(b * micro_batch_size, (b + 1) * micro_batch_size)) for b in range(rank, num_batches, world_size)]
