"""One rank's run: start-up (data, resume point, engine, components), the training loop, and the end.

The loop is the algorithm: next batches, a step, the monitors' verdict, a log line when due; then the step
goes to the components that own their cadence: the evaluator (validation, best metric, early stopping) and
the checkpointer (saves, best marker, retention).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.files import write_durable
from trainer.checkpointing import resume, store
from trainer.checkpointing.checkpointer import Checkpointer
from trainer.checkpointing.store import TrainState
from trainer.config import Config, TrainSection
from trainer.data import Batches
from trainer.engine import Engine
from trainer.engine.deepspeed_engine import build_engine
from trainer.evaluator import Evaluator
from trainer.model.lora import base_of
from trainer.model.moe import Router, routing
from trainer.observe.metrics import MetricsLogger
from trainer.observe.monitors import FileVerifier, Monitors, PhaseTimer, StopRequest
from trainer.observe.perf import PRECISION_DTYPES, Throughput, flops_per_token, peak_flops
from trainer.observe.report import render
from trainer.parallel import distributed, sequence
from trainer.tasks import task_of

log = logging.getLogger("zerotrain")


@dataclass
class Run:
    """What the loop works with."""

    engine: Engine
    batches: Batches
    monitors: Monitors
    evaluator: Evaluator
    checkpointer: Checkpointer
    metrics: MetricsLogger
    state: TrainState
    loss_fn: object  # the task's loss of a micro-batch
    grad_accum: int  # micro-batches per optimizer step on this many ranks
    router: Router | None  # a mixture of experts' load-balancing loss and expert load


def train(cfg: Config, resume_from: str | None) -> int:
    """`resume_from`: the checkpoint the pre-flight chose to continue from (None: start afresh). Returns the
    rank's exit code: 0 when train.max_steps is reached or early stopping ended the run, monitors.EXIT_SAVED when
    a stop signal ended it after a save, monitors.EXIT_FAILED when nothing could be saved."""
    stop = StopRequest()  # first: a signal during start-up must not kill the rank
    rank = distributed.init(timedelta(seconds=cfg.launch.collective_timeout), cfg.layout)
    _setup_logging(cfg.run_dir, rank)
    log.info(f"rank {rank.rank} of {rank.world_size} (local rank {rank.local_rank}) on {socket.gethostname()}, "
             f"device {rank.device}")
    run = _start(cfg, rank, stop, resume_from)
    if run.state.step == 0:
        run.evaluator.at_start(run.engine)
    code = _loop(run, cfg.train, cfg.data.seq_len)
    results, artifacts = _finish(cfg, run, rank) if code == 0 else ({}, [])
    run.metrics.close(code, results, artifacts)
    distributed.shutdown()
    return code


def _start(cfg: Config, rank: distributed.Rank, stop: StopRequest, resume_from: str | None) -> Run:
    task = task_of(cfg)
    data = task.open_data(cfg)
    # Verifying and converting checkpoints, and committing saves, wait for the slowest rank's share of long
    # work: on a group of their own, not bounded by launch.collective_timeout.
    long_work = dist.new_group(backend="gloo", timeout=distributed.LONG_WORK_TIMEOUT)
    point = resume.at_ranks(cfg.run_dir, resume_from, cfg.layout, log.info, long_work) if resume_from else None
    state, own = resume.read_position(cfg.run_dir, point) if point else (TrainState(), None)
    # The loader's workers start now, before the model and optimizer exist: forked later, each would keep a
    # copy of every page the rank writes afterwards (copy on write), multiplying the rank's memory.
    batches = data.batches(cfg, rank, state.consumed_samples, own["stream"] if own else None)
    model_config = task.model_config(cfg.model, data.vocab_size, data)
    shard = sequence.setup(model_config, cfg.layout, cfg.train.micro_batch_size, cfg.data.seq_len,
                           cfg.data.document_masking)
    loss = task.loss(cfg, data, shard)
    engine, arch = build_engine(cfg, model_config, task.auto_model, universal=bool(point and point.universal),
                                fresh_head=task.fresh_head)
    moe = routing(model_config)
    router = Router(engine.module, moe, engine.device) if moe else None
    if point:
        engine.load(store.checkpoints_dir(cfg.run_dir), resume.load_tag(point))
        if own:
            store.set_rng_states(own["rng"])
        log.info(f"resumed from step {state.step} ({state.consumed_samples} samples consumed)")
    # The data trained on from here: the pre-flight checked it against the checkpoint's, or was told to allow it.
    state = replace(state, data_fingerprint=data.fingerprint, vocab_size=data.vocab_size, layout=cfg.layout.to_dict(),
                    base_fingerprint=base_of(cfg.model))
    metrics = MetricsLogger(cfg, state.step, enabled=rank.is_main)
    metrics.text("config", cfg.to_yaml())
    metrics.text("versions", _versions())
    for line in data.describe():
        log.info(line)
    metrics.text("data", "\n".join(data.describe()))
    peak, peak_source = peak_flops(rank.device, PRECISION_DTYPES[cfg.train.precision], cfg.train.peak_tflops)
    per_token = flops_per_token(arch, cfg.data.seq_len)
    log.info(f"{per_token / 1e6:.1f} MFLOPs per token; MFU against {peak / 1e12:.2f} TFLOP/s per rank "
             f"({peak_source})")
    throughput = Throughput(cfg.train.global_batch_size, cfg.data.seq_len, rank.world_size, per_token, peak)
    verifier = FileVerifier(data.record.files(), rank.rank, rank.world_size) if data.record else None
    return Run(engine, batches, Monitors(cfg.train, rank.device, stop, throughput, verifier),
               Evaluator(cfg.eval, task.validation(cfg, data, rank, loss), metrics, cfg.train.max_steps),
               Checkpointer(cfg.checkpoint, cfg.run_dir, engine, batches.state, metrics, cfg.train.max_steps,
                            cfg.async_saves, long_work),
               metrics, state, loss, cfg.grad_accum, router)


def _loop(run: Run, t: TrainSection, seq_len: int) -> int:
    engine, monitors, state = run.engine, run.monitors, run.state
    monitors.nonfinite.start(engine.skipped_steps)
    for step in range(state.step + 1, t.max_steps + 1):
        lr = engine.lr
        loss = _train_step(engine, run.batches.iterator, run.loss_fn, run.grad_accum, monitors.phases, run.router)
        state = state.advanced(t.global_batch_size, t.global_batch_size * seq_len)
        run.metrics.advance(step)
        health = monitors.after_step(step, loss, engine.skipped_steps)
        if monitors.log_due(step):
            run.metrics.log(step, {**monitors.record(step, engine, lr, state.tokens_seen),
                                   **run.batches.metrics(state.consumed_samples),
                                   **(run.router.metrics() if run.router else {})})
        state, verdict = run.evaluator.after_step(engine, step, state)
        saved = run.checkpointer.after_step(step, state, health, verdict)
        if verdict.results or saved:
            monitors.exclude_since_last()
        run.state = state
        if health.stopping:  # a save in flight, this step's or an earlier one, commits before the rank leaves
            committed = run.checkpointer.wait(step)
            return monitors.stopped(step, committed if saved else None)
        if verdict.early_stop:
            break
    return 0


def _train_step(engine: Engine, batches, loss_fn, grad_accum: int, phases: PhaseTimer, router: Router | None) \
        -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss (no host sync): the
    task's, without a mixture of experts' load-balancing loss, which its gradients include."""
    total = torch.zeros((), device=engine.device)
    phases.restart()  # the loop's own bookkeeping since the last step is no phase of this one
    for _ in range(grad_accum):
        batch = distributed.to_device(next(batches), engine.device)
        phases.mark("data")
        loss = loss_fn(engine, batch)
        phases.mark("forward")
        engine.backward(loss if router is None else loss + router.penalty())
        phases.mark("backward")
        engine.step()  # the optimizer steps after the last micro-batch
        phases.mark("optimizer")
        total += loss.detach().float()
    return total / grad_accum


def _finish(cfg: Config, run: Run, rank: distributed.Rank) -> tuple[dict[str, float], list[Path]]:
    """The last save committed, then the final test (classification), summary.json and report.png. Returns the
    final results and the files the trackers keep (rank 0's)."""
    run.checkpointer.wait(run.state.step)
    results = run.evaluator.final(run.engine, run.state,
                                  lambda step: store.load_weights(run.engine, cfg.run_dir, step))
    if not rank.is_main:
        return {}, []
    report = render(cfg.run_dir)
    log.info(f"curves drawn in {report}")
    if run.monitors.last_loss is None:  # no step in this launch
        return {}, [report]
    final = {name: value for name, value in results.items() if isinstance(value, float)}
    return {"train/loss": run.monitors.last_loss, **final}, [_write_summary(cfg, run, results), report]


def _write_summary(cfg: Config, run: Run, results: dict) -> Path:
    """summary.json: where the run ended. Throughput covers this launch, start-up excluded."""
    state, window = run.state, run.monitors.window
    root = store.checkpoints_dir(cfg.run_dir)
    summary = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "final_loss": run.monitors.last_loss,
        **{name.replace("/", "_"): value for name, value in results.items()},  # val_loss, test_accuracy, ...
        "best_checkpoint": str(root / store.tag_of(state.best_step)) if state.best_step else None,
        "tokens_per_s": window.train_steps * cfg.tokens_per_step / window.train_seconds
        if window.train_seconds else None,
        "checkpoint": str(root / store.pointer(cfg.run_dir, store.LATEST)),
        "tensorboard": str(cfg.run_dir / "tensorboard") if "tensorboard" in cfg.metrics.trackers else None,
    }
    write_durable(cfg.run_dir / "summary.json", json.dumps(summary, indent=2))
    return cfg.run_dir / "summary.json"


def _versions() -> str:
    from importlib.metadata import version

    return "\n".join(f"{name} {version(name)}" for name in ("torch", "deepspeed", "transformers")) + \
        f"\npython {sys.version.split()[0]}"


def _setup_logging(run_dir: Path, rank: distributed.Rank) -> None:
    """Every rank logs to logs/rank{N}.log; only rank 0 (and other ranks' warnings) reach the console."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank.rank}] %(levelname)s %(message)s", "%H:%M:%S")
    file = logging.FileHandler(run_dir / "logs" / f"rank{rank.rank}.log")
    file.setFormatter(fmt)
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank.is_main else logging.WARNING)
    for name in ("zerotrain", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [file, console]
        logger.propagate = False
    logging.getLogger("zerotrain").setLevel(logging.INFO)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
