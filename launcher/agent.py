"""Start this node's ranks with torch's elastic agent (the machinery behind torchrun), wait for them, and say
how they ended.

The agent gives each rank RANK/WORLD_SIZE/LOCAL_RANK and a rendezvous with the other nodes' agents,
watches the processes, and when one fails ends the others at once (on every node) and reports the
failing rank's traceback (recorded by `@record` in trainer.main); with launch.max_restarts it starts
them again, and they resume from the last checkpoint.

Stop signals to the launcher (SIGTERM, SIGUSR1, SIGHUP, Ctrl-C) reach the ranks, which finish their step and
save together; the agent waits launch.stop_timeout seconds for that. A second Ctrl-C stops them at once.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from launcher.environment import set_process_defaults
from launcher.failures import describe_failures, unreadable_report
from trainer.checkpointing import store
from trainer.config import Config
from trainer.observe.monitors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_SAVED


@dataclass(frozen=True)
class Rendezvous:
    """How this node's agent meets the others' (one node needs neither): static - this node's rank and the
    address of node 0 - or c10d, a host:port every agent reaches."""

    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    endpoint: str | None = None


class StopSignals:
    """The launcher's own handlers for the stop signals (torch's would start a second shutdown on a repeated
    signal). The first raises the agent's SignalException: it passes the signal to the ranks and waits for
    their save. Repeats are ignored, except a second Ctrl-C, which kills the ranks at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.first: signal.Signals | None = None
        self.latest_then: str | None = None  # the newest checkpoint when the first signal came
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.first is None:
            self.first, self.latest_then = sig, store.pointer(self.run_dir, store.LATEST)
            if sig == signal.SIGINT:
                print("zerotrain: Ctrl-C: the ranks finish their step, save and stop (Ctrl-C again: stop at once, "
                      "without saving)", file=sys.stderr, flush=True)
            raise SignalException(f"{sig.name} received", sigval=sig)
        if sig == signal.SIGINT:
            for rank in psutil.Process().children():
                try:
                    os.killpg(rank.pid, signal.SIGKILL)  # each rank leads its own group, with its loader workers
                except OSError:
                    pass
            saved = store.pointer(self.run_dir, store.LATEST)
            if saved != self.latest_then:  # the save the first Ctrl-C asked for committed in between
                said, code = f"stopped at once; saved {saved} before it: continue with --resume auto", EXIT_SAVED
            else:
                said, code = "stopped at once, without saving", EXIT_INTERRUPTED
            print(f"zerotrain: second Ctrl-C: {said}", file=sys.stderr, flush=True)
            os._exit(code)

    def outcome(self) -> int:
        """After the agent has stopped the ranks: EXIT_SAVED if they saved since the signal, said in one line."""
        saved = store.pointer(self.run_dir, store.LATEST)
        name = "Ctrl-C" if self.first == signal.SIGINT else self.first.name
        if saved == self.latest_then:
            print(f"zerotrain: stopped by {name}; nothing was saved since the signal (last checkpoint: "
                  f"{saved or 'none'})", file=sys.stderr)
            return EXIT_FAILED
        print(f"zerotrain: stopped by {name}; saved {saved}: continue with --resume auto", file=sys.stderr)
        return EXIT_SAVED


def run_agent(config_file: Path, cfg: Config, resume_from: str | None, rendezvous: Rendezvous) -> int:
    """Runs this node's ranks to the end; returns the launcher's exit code, having said how they ended.
    `resume_from`: the checkpoint the pre-flight chose, which the ranks continue from."""
    stop = StopSignals(cfg.run_dir)
    resuming = ("--resume-from", resume_from) if resume_from else ()
    try:
        elastic_launch(_launch_config(cfg, rendezvous), sys.executable)("-m", "trainer.main", str(config_file),
                                                                       *resuming)
    except SignalException:
        return stop.outcome()
    except ChildFailedError as e:
        print("\n".join(describe_failures(e.failures, cfg.run_dir)), file=sys.stderr)
        return EXIT_FAILED
    except ValueError as e:  # torch could not parse a rank's error file (torn: a full disk, a kill while written)
        print("\n".join(unreadable_report(e, cfg.run_dir)), file=sys.stderr)
        return EXIT_FAILED
    print(f"zerotrain: run {cfg.run.name} finished; `zerotrain status {cfg.run_dir}` summarises it")
    return 0


def _launch_config(cfg: Config, rendezvous: Rendezvous) -> LaunchConfig:
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
    return LaunchConfig(
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
        # StopSignals handles the stop signals; torch's handler is left SIGQUIT (quit: the ranks are killed).
        signals_to_handle="SIGQUIT",
        shutdown_timeout=cfg.launch.stop_timeout,
    )
