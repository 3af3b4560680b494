"""The parallel layout of a run: how its ranks share the work, decided once from `parallel.*` and the world size.

Consecutive ranks form a model-parallel group that trains the same samples: a sequence group (Ulysses, each
rank a slice of every sequence) or a tensor group (AutoTP, each rank a slice of every linear layer); they do
not compose. The groups are data-parallel: group g trains the samples of data rank g. DeepSpeed is told of the
tensor groups (AutoTP) but not of the sequence groups: it sees every rank of a sequence group as data-parallel
(trainer/parallel/sequence.py says why), so its ZeRO partitions span world / tensor ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ParallelLayout:
    world: int  # ranks of the job
    sequence: int = 1  # parallel.sequence
    tensor: int = 1  # parallel.tensor
    expert: int = 1  # parallel.expert: a mixture of experts' experts split over this many ranks (AutoEP)

    @property
    def model_parallel(self) -> int:
        """Consecutive ranks that train the same samples."""
        return self.sequence * self.tensor

    @property
    def data_world(self) -> int:
        """The ranks (groups) that train different samples."""
        return self.world // self.model_parallel

    @property
    def zero_world(self) -> int:
        """The ranks ZeRO partitions a parameter's states over: those holding the same tensor slice."""
        return self.world // self.tensor

    def data_rank(self, rank: int) -> int:
        """Which samples `rank` trains: those of its whole group."""
        return rank // self.model_parallel

    def groups(self) -> list[list[int]]:
        """The model-parallel groups, consecutive ranks each."""
        return [list(range(first, first + self.model_parallel)) for first in range(0, self.world, self.model_parallel)]

    def grad_accum(self, global_batch: int, micro_batch: int) -> int:
        """Micro-batches per optimizer step on each rank (a group shares its samples)."""
        return global_batch // (micro_batch * self.data_world)

    def deepspeed_batch(self, global_batch: int) -> int:
        """DeepSpeed's train_batch_size: it counts every rank's micro-batches (sequence slices count as samples to
        it; under AutoTP its batch check counts every rank too - measured), though it averages gradients over the
        data-parallel ranks only."""
        return global_batch * self.model_parallel

    def same_files(self, other: ParallelLayout) -> bool:
        """Whether DeepSpeed's checkpoint files of one fit the other: a rank's ZeRO partition, tensor slice and
        experts depend on these (the sequence groups are invisible to DeepSpeed)."""
        return (self.world, self.tensor, self.expert) == (other.world, other.tensor, other.expert)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> ParallelLayout:
        return cls(**fields)

    def __str__(self) -> str:
        groups = "".join(f", parallel.{name} {n}" for name, n in (("sequence", self.sequence), ("tensor", self.tensor),
                                                                  ("expert", self.expert)) if n > 1)
        return f"{self.world} rank{'s' * (self.world > 1)}{groups}"
