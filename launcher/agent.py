"""Start this node's ranks with torch's elastic agent (the machinery behind torchrun) and wait for them.

The agent gives each rank RANK/WORLD_SIZE/LOCAL_RANK and a rendezvous with the other nodes' agents,
watches the processes, and when one fails ends the others at once (on every node) and reports the
failing rank's traceback (recorded by `@record` in trainer.main); with launch.max_restarts it starts
them again, and they resume from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from launcher.environment import set_process_defaults
from trainer.config import Config


@dataclass(frozen=True)
class Rendezvous:
    """How this node's agent meets the others' (one node needs neither): static - this node's rank and the
    address of node 0 - or c10d, a host:port every agent reaches."""

    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    endpoint: str | None = None


def launch(config_file: Path, cfg: Config, resume: str, rendezvous: Rendezvous) -> None:
    """Raises torch's ChildFailedError when a rank fails, SignalException when the launcher is signalled."""
    set_process_defaults(cfg.launch.nproc_per_node)
    # torch 2.13's agent hands restarted ranks its own store with the dead attempt's gloo addresses still in
    # it (connectFullMesh: connection refused); with this rank 0 hosts a fresh store on every attempt.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if rendezvous.master_addr:
        backend, endpoint = "static", f"{rendezvous.master_addr}:{rendezvous.master_port}"
        configs, run_id = {"rank": rendezvous.node_rank}, "zerotrain"
    elif rendezvous.endpoint:
        backend, endpoint, configs, run_id = "c10d", rendezvous.endpoint, {}, f"zerotrain-{cfg.run.name}"
    else:  # one node: a free port on loopback, as torchrun --standalone
        backend, endpoint, configs, run_id = "c10d", "127.0.0.1:0", {}, str(uuid.uuid4())
    launch_config = LaunchConfig(
        min_nodes=cfg.launch.nnodes,
        max_nodes=cfg.launch.nnodes,
        nproc_per_node=cfg.launch.nproc_per_node,
        run_id=run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
        max_restarts=cfg.launch.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(cfg.run_dir / "logs" / "agent")),
        # On these the agent passes the signal to the ranks, which save and leave (trainer.train.StopRequest);
        # it waits launch.stop_timeout seconds for that before killing them.
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        shutdown_timeout=cfg.launch.stop_timeout,
    )
    elastic_launch(launch_config, sys.executable)("-m", "trainer.main", str(config_file), "--resume", resume)
