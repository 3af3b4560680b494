"""Gloo ranks spawned inside a test (or a benchmark): a free loopback port, joining the group, every rank's
result. For code that runs under a process group without the `zerotrain` command around it."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    """In a spawned rank: the environment a launcher would give it (the cores shared out), then the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def spawn(fn, ranks: int, *args) -> list[dict]:
    """`ranks` fresh processes running fn(rank, ranks, port, *args, out), each writing out/rank{rank}.json;
    every rank's result."""
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(_rank, args=(fn, ranks, free_port(), *args, out), nprocs=ranks,
                                              start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def _rank(rank: int, fn, *args) -> None:
    """fn as one spawned rank, which then leaves as zerotrain's ranks do (trainer/main.py exit_now): past a barrier,
    its group destroyed, without interpreter teardown - whose gloo threads can abort it ("terminate called
    without an active exception", SIGABRT, seen in CI)."""
    fn(rank, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_result(out: str, rank: int, result: dict) -> None:
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
