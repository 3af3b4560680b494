"""Process-group set-up and teardown for one rank, on CUDA + NCCL or CPU + gloo: the device is decided here, once
(`uses_gpus`), for the pre-flight and the ranks alike."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.parallel.layout import ParallelLayout

# Work shared by the ranks that may take long on a large model (verifying and converting checkpoints, writing a
# save) synchronises on a gloo group with this timeout; a dead peer still ends it at once (its sockets close).
LONG_WORK_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: ParallelLayout  # who shares this rank's samples

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which samples this rank trains: the same as the rest of its sequence or tensor group."""
        return self.layout.data_rank(self.rank)

    @property
    def data_world(self) -> int:
        return self.layout.data_world


def uses_gpus() -> bool:
    """Whether the ranks of this machine train on GPUs (one each), else on the CPU."""
    return torch.cuda.is_available()


def die_with_parent() -> None:
    """A rank must not outlive its launcher (SIGKILLed, or its session lost), nor a loader worker its rank: an
    orphan would go on writing into the run directory beside the restarted job. Linux only (elsewhere a no-op)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def init(timeout: timedelta, layout: ParallelLayout) -> Rank:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR...). A dead
    peer must end the job, not hang it: its collectives give up after `timeout` (launch.collective_timeout)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if uses_gpus():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    from trainer.engine.deepspeed_engine import init_process_group  # the CLI imports this module: no DeepSpeed

    init_process_group("nccl" if device.type == "cuda" else "gloo", timeout)
    if dist.get_world_size() != layout.world:
        raise RuntimeError(f"the launcher started {dist.get_world_size()} ranks for a run of {layout.world}")
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, device, layout)


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
