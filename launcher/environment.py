"""The place among ranks a scheduler or MPI already gave this process, in torch's names.

`srun zerotrain train CONFIG`, `mpirun -np N zerotrain train CONFIG` and `torchrun ... zerotrain train CONFIG`
start every rank themselves: each `zerotrain` process is then one rank, and its place comes from the
environment. Slurm's names (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE...) and MPI's (asked
through mpi4py) are translated to the RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR /
MASTER_PORT that torch.distributed reads. Without any of them, `zerotrain train` starts the ranks itself.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from data_pipeline.errors import UserError

MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class Placement:
    source: str  # "slurm", "mpi" or "torchrun": who started the ranks
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    nnodes: int
    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def set_process_defaults(ranks_on_this_node: int) -> None:
    """Threads for the ranks of this node, unless the user set them (DeepSpeed's device: trainer/engine)."""
    # On CPU each rank's BLAS threads share the cores: oversubscription slows every rank down.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_on_this_node)))


def detect(env: Mapping[str, str] = os.environ) -> Placement | None:
    """This process's place among ranks started by torchrun, srun or mpirun; None when nobody started ranks."""
    if "TORCHELASTIC_RUN_ID" in env:
        return _torchrun(env)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # a task of `srun` (the batch script itself is not)
        return _slurm(env)
    if any(name in env for name in MPI_VARIABLES):
        return _mpi(env)
    return None


def _torchrun(env: Mapping[str, str]) -> Placement:
    world = int(env["WORLD_SIZE"])
    local_world = int(env["LOCAL_WORLD_SIZE"])
    return Placement("torchrun", int(env["RANK"]), world, int(env["LOCAL_RANK"]), local_world, world // local_world,
                  env["MASTER_ADDR"], int(env["MASTER_PORT"]))


def _slurm(env: Mapping[str, str]) -> Placement:
    per_node = tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
    node = int(env["SLURM_NODEID"])
    job = int(env["SLURM_JOB_ID"])
    # A port derived from the job id: the same on every node without talking, and unlikely to clash with
    # another job sharing the first node. MASTER_PORT in the environment wins.
    port = int(env.get("MASTER_PORT", 20000 + job % 20000))
    return Placement("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_LOCALID"]),
                  per_node[node], len(per_node), env.get("MASTER_ADDR") or _first_host(env["SLURM_STEP_NODELIST"]),
                  port)


def tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"SLURM_STEP_TASKS_PER_NODE: cannot read {value!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('n[1-4]' -> 'n1'), as scontrol expands it."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def _mpi(env: Mapping[str, str]) -> Placement:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this machine
    # Rank 0 chooses the rendezvous address and a free port on its host and tells everyone.
    master = world.bcast((env.get("MASTER_ADDR") or _own_address(world.Get_size() == node.Get_size()),
                          int(env.get("MASTER_PORT", 0)) or _free_port()) if world.Get_rank() == 0 else None)
    nodes = world.allreduce(1 if node.Get_rank() == 0 else 0)
    return Placement("mpi", world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size(), nodes, *master)


def _own_address(single_host: bool) -> str:
    return "127.0.0.1" if single_host else socket.gethostbyname(socket.gethostname())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
