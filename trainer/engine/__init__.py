"""The training engine: what the loop, the evaluator, the monitors and the checkpointer ask of it (`Engine`).

DeepSpeed is the engine (trainer/engine/deepspeed_engine.py). This sub-package is the only code of the trainer
that imports deepspeed: its JSON config (deepspeed_config.py), what it cannot do (limits.py), its checkpoint
engine (checkpoint_engine.py), the universal conversion and consolidation of its checkpoints (universal.py,
weights.py), Ulysses attention (ulysses.py), NVMe offload's op (nvme.py) and the repairs of the version named
here (repairs.py). Importing this module imports no DeepSpeed.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from trainer.parallel.distributed import uses_gpus

# DeepSpeed probes for a device, and warns on a machine without a GPU, unless it is told: told before any module
# of this package imports it, so that a pre-flight's refusal is the one line it prints.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if uses_gpus() else "cpu")

# The DeepSpeed release every limit, repair and measurement in this package was made with (constraints.txt pins it).
DEEPSPEED = "0.19.8"


class Engine(ABC):
    """A model being trained on this rank, with its optimizer, learning-rate schedule and checkpoints."""

    device: torch.device
    module: torch.nn.Module  # the model (a rank's partition or slice of it, under ZeRO 3 or tensor parallelism)

    @abstractmethod
    def __call__(self, **inputs):
        """The model's forward pass (training or, inside `evaluating`, evaluation)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """A micro-batch's gradients, summed into the step's."""

    @abstractmethod
    def step(self) -> None:
        """After each micro-batch: the optimizer step and the schedule's, once the step's micro-batches are done."""

    @abstractmethod
    def evaluating(self) -> AbstractContextManager:
        """Evaluation mode without gradients for the block, training mode after it."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""

    @property
    @abstractmethod
    def grad_norm(self) -> float | None:
        """The last step's gradient norm before clipping (None where the engine did not compute one)."""

    @property
    @abstractmethod
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far."""

    @abstractmethod
    def save(self, root: Path, tag: str) -> None:
        """Collective: the engine's state (weights, optimizer, schedule) into folder root/tag, through the
        checkpoint writer it was built with."""

    @abstractmethod
    def load(self, root: Path, tag: str, *, weights_only: bool = False) -> None:
        """Collective: the state saved in root/tag (a universal conversion when the engine was built for one);
        `weights_only`: the model's weights alone."""
