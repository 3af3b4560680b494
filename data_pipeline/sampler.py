"""Which samples each rank trains on, in an order defined for the whole job rather than per rank.

Samples are numbered as in a ConcatDataset of the sources. Global position k (0, 1, 2, ...) belongs to
block b = k // BLOCK; every block holds each source in a fixed number of slots (its weight's share, by
largest remainder), in an order shuffled per block. The j-th slot of source s overall is sample
perm_{s,e}[j % N_s] of that source's epoch e = j // N_s. Optimizer step s consumes positions
[s*G, (s+1)*G), split into contiguous equal slices by rank. So the samples of a step do not depend on the
world size, the realised mixture is exact to 1/BLOCK, and resuming after s steps at any world size
continues exactly where it stopped, computed directly rather than replayed.
"""
from collections.abc import Iterator

import numpy as np

BLOCK = 4096  # positions per mixture block: the realised mixture is within 1/BLOCK of the weights


class GlobalOrder:
    """Global position -> sample index (into the concatenation of the sources' samples)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes: every source needs at least one sample (got {sizes})")
        if len(weights) != len(sizes) or min(weights) <= 0:
            raise ValueError(f"weights: need one positive weight per source (got {weights})")
        self.sizes, self.seed = list(sizes), seed
        self.offsets = np.cumsum([0] + self.sizes[:-1])
        self.slots = _largest_remainder(np.asarray(weights, float) / sum(weights), BLOCK)
        self._block = (-1, None, None)  # (block, source of each slot, rank of the slot within its source)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation): one epoch kept

    def sample(self, position: int) -> int:
        block, j = divmod(position, BLOCK)
        sources, ranks = self._block_slots(block)
        s = int(sources[j])
        epoch, i = divmod(block * int(self.slots[s]) + int(ranks[j]), self.sizes[s])
        return int(self.offsets[s] + self._perm(s, epoch)[i])

    def counts(self, position: int) -> np.ndarray:
        """How many of the first `position` positions each source filled: the realised mixture."""
        block, j = divmod(position, BLOCK)
        sources, _ = self._block_slots(block)
        return block * self.slots + np.bincount(sources[:j], minlength=len(self.sizes))

    def _block_slots(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if self._block[0] != block:
            labels = np.repeat(np.arange(len(self.sizes)), self.slots)
            sources = np.random.default_rng([self.seed, 1, block]).permutation(labels)
            ranks = np.empty(BLOCK, np.int64)
            for s in range(len(self.sizes)):
                where = np.flatnonzero(sources == s)
                ranks[where] = np.arange(len(where))
            self._block = (block, sources, ranks)
        return self._block[1], self._block[2]

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        if self._perms.get(source, (None,))[0] != epoch:
            # uint32 indices shuffled in place: 4 bytes per sample, not the 8 of a default permutation
            index_type = np.uint32 if self.sizes[source] < 2**32 else np.uint64
            perm = np.arange(self.sizes[source], dtype=index_type)
            np.random.default_rng([self.seed, 0, source, epoch]).shuffle(perm)
            self._perms[source] = (epoch, perm)
        return self._perms[source][1]


class GlobalBatchSampler:
    """A DataLoader `batch_sampler`: yields this rank's micro-batches (lists of sample indices), forever."""

    def __init__(self, order: GlobalOrder, global_batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, consumed_samples: int = 0):
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
        self.order = order
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.world_size
        step_start = self.consumed_samples
        while True:
            rank_start = step_start + self.rank * per_rank
            for mb_start in range(rank_start, rank_start + per_rank, self.micro_batch_size):
                yield [self.order.sample(k) for k in range(mb_start, mb_start + self.micro_batch_size)]
            step_start += self.global_batch_size


def eval_batches(num_samples: int, micro_batch_size: int, rank: int, world_size: int,
                 max_batches: int) -> list[list[int]]:
    """The first max_batches sequential micro-batches of the split (the incomplete last one dropped), dealt
    round-robin to ranks: the same batches are evaluated at any world size."""
    num_batches = min(num_samples // micro_batch_size, max_batches)
    return [list(range(b * micro_batch_size, (b + 1) * micro_batch_size)) for b in range(rank, num_batches, world_size)]


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer slots proportional to `shares`, summing to `total`, each source at least one slot."""
    exact = shares * total
    slots = np.maximum(np.floor(exact).astype(np.int64), 1)
    by_remainder = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for s in by_remainder[: max(0, total - slots.sum())]:
        slots[s] += 1
    while slots.sum() > total:  # minimum slots of tiny sources taken from the largest
        slots[np.argmax(slots)] -= 1
    return slots
