"""Process-group set-up and teardown for one rank, on CUDA + NCCL or CPU + gloo, chosen at run time."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist



# Work shared by the ranks that may take long on a large model (verifying and converting checkpoints, writing a
# save) synchronises on a gloo group with this timeout; a dead peer still ends it at once (its sockets close).
LONG_WORK_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # parallel.sequence x parallel.tensor: consecutive ranks share each sample, each a slice of its sequence
    # or of the model's weights
    model_parallel: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which samples this rank trains: the same as the rest of its sequence or tensor group."""
        return self.rank // self.model_parallel

    @property
    def data_world(self) -> int:
        return self.world_size // self.model_parallel


def die_with_parent() -> None:
    """A rank must not outlive its launcher (SIGKILLed, or its session lost), nor a loader worker its rank: an
    orphan would go on writing into the run directory beside the restarted job. Linux only (elsewhere a no-op)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def init(timeout: timedelta, model_parallel: int = 1) -> Rank:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR...). A dead
    peer must end the job, not hang it: its collectives give up after `timeout` (launch.collective_timeout)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    import deepspeed  # here, not at the top: the CLI imports this module and needs no DeepSpeed

    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timeout,
        verbose=False,
    )
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, device, model_parallel)


def to_device(batch, device: torch.device):
    """A token tensor (pretraining) or a dict of tensors (classification) on the rank's device. To a GPU through
    pinned memory, so the copy runs asynchronously (torch's pinned-block cache reuses a block only after it)."""
    if isinstance(batch, dict):
        return {name: to_device(tensor, device) for name, tensor in batch.items()}
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Average scalars over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def shutdown() -> None:
    """Barrier before destroying the group: without it gloo ranks sometimes abort at exit (ZeRO-3 exit crash)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
