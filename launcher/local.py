"""Start N ranks on this machine with torch's elastic agent and wait for them.

The agent (the machinery behind torchrun) gives each rank RANK/WORLD_SIZE/LOCAL_RANK and a
rendezvous, watches the processes, and when one fails ends the others at once and reports the
failing rank's traceback (recorded by `@record` in trainer.main).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch_local(config_file: Path, nproc: int, resume: str, logs_dir: Path, stop_timeout: int) -> None:
    """Raises torch's ChildFailedError when a rank fails, SignalException when the launcher is signalled."""
    # On CPU each rank's BLAS threads share the cores: oversubscription slows every rank down.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Tell DeepSpeed the device this machine has, rather than letting every rank probe and warn.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(logs_dir / "agent")),
        # On these the agent passes the signal to the ranks, which save and leave (trainer.train.StopRequest);
        # it waits stop_timeout seconds for that before killing them.
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        shutdown_timeout=stop_timeout,
    )
    elastic_launch(launch, sys.executable)("-m", "trainer.main", str(config_file), "--resume", resume)
