"""The training loop of one rank: DeepSpeed engine, batches, logging, validation, best and last checkpoints."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers.integrations import HfDeepSpeedConfig

from trainer import checkpoint, distributed
from trainer.config import Config
from trainer.data import Corpus, Mixture, corpus, to_device, train_batches
from trainer.deepspeed_config import deepspeed_config
from trainer.metrics import MetricsLogger
from trainer.model import LOSSES, architecture, build_model, model_config
from trainer.optim import param_groups, warmup_cosine
from trainer.perf import PRECISION_DTYPES, PhaseTimer, Throughput, flops_per_token, memory_gib, peak_flops
from trainer.report import render
from trainer.validation import ClassifierValidation, Validation

log = logging.getLogger("zerotrain")


def train(cfg: Config, resume: bool) -> int:
    """Returns the rank's exit code: 0 when max_steps is reached, checkpoint.EXIT_SAVED when stopped by a signal."""
    stop = StopRequest()  # first: a signal during start-up must not kill the rank
    rank = distributed.init()
    _setup_logging(cfg.run_dir, rank)
    log.info(f"rank {rank.rank} of {rank.world_size} (local rank {rank.local_rank}) on {socket.gethostname()}, "
             f"device {rank.device}")
    data = corpus(cfg)
    start = checkpoint.choose(cfg.run_dir, log.warning) if resume else None
    engine, per_token = _build_engine(cfg, data, load_universal=bool(start and start.universal))
    peak, peak_source = peak_flops(rank.device, PRECISION_DTYPES[cfg.train.precision])
    log.info(f"{per_token / 1e6:.1f} MFLOPs per token; MFU against {peak / 1e12:.2f} TFLOP/s per rank "
             f"({peak_source})")
    throughput = Throughput(cfg.train.global_batch_size, cfg.data.seq_len, rank.world_size, per_token, peak)
    restored = checkpoint.load(engine, cfg.run_dir, start) if start else None
    state, stream_state = restored or (checkpoint.TrainState(), None)
    # The data trained on from here: the launcher checked it against the checkpoint's, or was told to allow it.
    state = replace(state, data_fingerprint=data.fingerprint)
    if restored:
        log.info(f"resumed from step {state.step} ({state.consumed_samples} samples consumed)")
    batches = train_batches(cfg, data, rank, state.consumed_samples, stream_state)
    validation = _validation(cfg, data, rank)
    metrics = MetricsLogger(cfg.run_dir, cfg.train.max_steps, state.step, enabled=rank.is_main)
    metrics.text("config", cfg.to_yaml())
    metrics.text("versions", _versions())
    if data.labelled:  # class imbalance, visible before the first step
        counts = data.labelled.info["splits"]["train"]["label_counts"]
        log.info("training examples per label: " + ", ".join(f"{label} {n}" for label, n in counts.items()))
        metrics.text("labels", "\n".join(f"{label}: {n} training examples" for label, n in counts.items()))
    sources = data.manifest.sources if data.manifest else []
    mixture = Mixture(sources, batches.order) if len(sources) > 1 else None
    code = _run(cfg, engine, batches, validation, mixture, metrics, state, rank, stop, throughput)
    metrics.close()
    if rank.is_main and code == 0:
        log.info(f"curves drawn in {render(cfg.run_dir)}")
    distributed.shutdown()
    return code


def _build_engine(cfg: Config, data: Corpus, load_universal: bool):
    """The DeepSpeed engine, and the model's training FLOPs per token. The model's shape comes from a build on
    the meta device first: bucket sizes follow its parameter count, and at stage 3 it is then built
    partitioned (`deepspeed.zero.Init`, unless zero.partitioned_init is off): no rank ever holds all of it."""
    config = model_config(cfg.model, data.vocab_size, data.labelled.labels if data.labelled else None,
                          data.pad_token_id)
    arch = architecture(cfg.model, config)
    ds_config = deepspeed_config(cfg, arch.params, load_universal, largest_parameter=max(arch.sizes))
    log.info(f"model: {config.model_type} ({cfg.model.task}), {arch.params / 1e6:.2f}M parameters, ZeRO stage "
             f"{cfg.zero.stage}, {cfg.train.precision}, grad accumulation {cfg.grad_accum}")
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    # While this object lives, transformers builds (and loads) models inside deepspeed.zero.Init.
    zero_init = HfDeepSpeedConfig(ds_config) if cfg.zero.stage == 3 and cfg.zero.partitioned_init else None
    model = build_model(cfg.model, config)
    if zero_init:
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        log.info(f"model built partitioned (deepspeed.zero.Init): this rank holds {held / 1e6:.2f}M of "
                 f"{arch.params / 1e6:.2f}M parameters")
    factor = warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, factor),
        config=ds_config,
    )
    del zero_init
    return engine, flops_per_token(arch, cfg.data.seq_len)


def _validation(cfg: Config, data: Corpus, rank: distributed.Rank):
    if data.labelled:
        return ClassifierValidation(cfg, data.labelled, rank)
    # Streaming data has no held-out split to validate on (see the README).
    return Validation(cfg, data.manifest, rank) if data.manifest else None


def _versions() -> str:
    import transformers

    return "\n".join(f"{name} {module.__version__}" for name, module in
                     (("torch", torch), ("deepspeed", deepspeed), ("transformers", transformers))) + \
        f"\npython {sys.version.split()[0]}"


def _run(cfg, engine, batches, validation, mixture, metrics, state, rank, stop, throughput) -> int:
    t = cfg.train
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    window = Window(engine.device)
    phases = PhaseTimer(engine.device)
    spikes = LossSpikes()
    loss_fn = LOSSES[cfg.model.task]
    logged_loss, validated = None, {}
    nonfinite_run = 0
    for step in range(state.step + 1, t.max_steps + 1):
        lr = engine.get_lr()[0]
        step_loss = _train_step(engine, batches.iterator, loss_fn, cfg.grad_accum, phases)
        window.add(step_loss)
        state = state.advanced(t.global_batch_size, tokens_per_step)
        metrics.advance(step)
        stopping, nonfinite = stop.agreed(engine.device, step_loss)
        nonfinite_run = nonfinite_run + 1 if nonfinite else 0
        if nonfinite_run >= t.max_nonfinite_steps:
            raise NonFiniteLoss(f"the loss was NaN or infinite for {nonfinite_run} step(s) in a row, up to step "
                                f"{step} (train.max_nonfinite_steps); resume from an earlier checkpoint with a "
                                "lower train.lr or longer train.warmup_steps, or check the data")
        if step == 1 or step % t.log_every == 0 or step == t.max_steps:
            loss, steps, seconds = window.flush()
            logged_loss = loss
            metrics.log(step, {
                "train/loss": loss, "train/lr": lr, "train/grad_norm": _grad_norm(engine),
                "train/loss_spikes": spikes.count(step, loss), "train/nonfinite_steps": nonfinite_run,
                # steps DeepSpeed skipped for non-finite gradients (ZeRO 1-3, and fp16 loss scaling)
                "train/skipped_steps": getattr(engine, "skipped_steps", 0),
                "train/tokens_seen": state.tokens_seen, **throughput.metrics(steps, seconds),
                **phases.flush(steps), **memory_gib(engine.device),
                **(mixture.fractions(state.consumed_samples) if mixture else {}),
            })
        improved = False
        if validation and (step == t.max_steps or (t.eval_every and step % t.eval_every == 0)):
            validated = validation.run(engine)
            metrics.log(step, validated)
            state, improved = _track_best(t, state, validated)
            window.exclude_since_last()
        early_stop = bool(t.early_stopping) and state.evals_since_best >= t.early_stopping
        if nonfinite:  # never make a checkpoint of weights a non-finite loss may have reached
            log.warning(f"step {step}: the loss is not finite; no checkpoint until it is")
        elif stopping or step == t.max_steps or improved or early_stop or \
                (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            started = time.perf_counter()
            folder = checkpoint.save(engine, cfg.run_dir, state, batches.stream.state_dict() if batches.stream
                                     else None, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
            seconds = time.perf_counter() - started  # training stands still meanwhile
            log.info(f"saved {folder} in {seconds:.2f} s")
            metrics.log(step, {"perf/checkpoint_s": seconds})
            if improved and rank.is_main:
                checkpoint.mark_best(cfg.run_dir, folder.name)
            window.exclude_since_last()
        if stopping:
            log.warning(f"{stop.name} received: saved step {step}; continue with --resume auto")
            return checkpoint.EXIT_SAVED
        if early_stop:
            log.info(f"early stopping at step {step}: {t.best_metric} not better than {state.best_value:.4f} "
                     f"(step {state.best_step}) in {state.evals_since_best} validations (train.early_stopping)")
            break
    if isinstance(validation, ClassifierValidation):
        validated = {**validated, **_final_test(cfg, engine, validation, metrics, state)}
    if rank.is_main and logged_loss is not None:
        _write_summary(cfg, state, logged_loss, validated, window)
        metrics.hparams(cfg.model_dump(mode="json"), {"train/loss": logged_loss, **{
            name: value for name, value in validated.items() if isinstance(value, float)}})
    return 0


def _track_best(t, state: checkpoint.TrainState, results: dict[str, float]):
    """The state with train.best_metric's best value so far, and whether this validation improved on it."""
    if t.best_metric is None:
        return state, False
    value = results[t.best_metric]
    lower_is_better = t.best_metric in ("val/loss", "val/ppl")
    if state.best_value is None or (value < state.best_value if lower_is_better else value > state.best_value):
        return replace(state, best_value=value, best_step=state.step, evals_since_best=0), True
    return replace(state, evals_since_best=state.evals_since_best + 1), False


def _final_test(cfg: Config, engine, validation: ClassifierValidation, metrics: MetricsLogger,
                state: checkpoint.TrainState) -> dict:
    """Classification: the scores of the best checkpoint (the final weights without train.best_metric) on the
    test split (the validation split if there is none), and its confusion matrix."""
    evaluated = state.best_step or state.step
    if evaluated != state.step:
        engine.load_checkpoint(str(checkpoint.checkpoints_dir(cfg.run_dir)), tag=checkpoint.tag_of(evaluated),
                               load_module_only=True, load_optimizer_states=False, load_lr_scheduler_states=False)
    split = "test" if validation.has("test") else "validation"
    results = validation.run(engine, split)
    table = validation.confusion_text()
    metrics.log(state.step, results)
    metrics.text(f"{split}_confusion_matrix", table)
    log.info(f"{split} split, weights of step {evaluated}: " +
             ", ".join(f"{name} {value:.4f}" for name, value in results.items()) + f"\n{table}")
    prefix = next(iter(results)).split("/")[0]
    return {**results, f"{prefix}/confusion_matrix": validation.confusion.int().tolist(), f"{prefix}/step": evaluated}


class StopRequest:
    """SIGTERM (a scheduler's or the launcher's stop) or SIGUSR1 (Slurm's warning before a time limit): the
    rank finishes its step, and once every rank has been told, they save together and leave."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.name = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    def agreed(self, device: torch.device, loss: torch.Tensor) -> tuple[bool, bool]:
        """Collective, once per step: (stop now, this step's loss was not finite on some rank). True on every
        rank as soon as any rank was signalled (they must save together). The loss check rides along: this
        all-reduce is the step's one host sync."""
        flags = torch.stack([torch.tensor(float(self.name is not None), device=device),
                             (~torch.isfinite(loss)).float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, nonfinite = (bool(flag) for flag in flags.tolist())
        if stop and self.name is None:
            self.name = "a stop signal (to another rank)"
        return stop, nonfinite


class NonFiniteLoss(RuntimeError):
    pass


class LossSpikes:
    """Logged losses far above the recent ones (6 standard deviations of an exponential moving window):
    counted and warned about, for a person to look at - training goes on."""

    def __init__(self, alpha: float = 0.1, sigmas: float = 6.0, warmup: int = 10):
        self.alpha, self.sigmas, self.warmup = alpha, sigmas, warmup
        self.mean = self.var = 0.0
        self.seen = self.spikes = 0

    def count(self, step: int, loss: float) -> int:
        """The number of spikes so far, `loss` included."""
        if self.seen >= self.warmup and loss > self.mean + self.sigmas * self.var**0.5:
            self.spikes += 1
            log.warning(f"loss spike at step {step}: {loss:.4f} against a recent {self.mean:.4f} "
                        f"+- {self.var**0.5:.4f}")
        delta = loss - self.mean if self.seen else 0.0
        self.mean = self.mean + self.alpha * delta if self.seen else loss
        self.var = (1 - self.alpha) * (self.var + self.alpha * delta**2)
        self.seen += 1
        return self.spikes


def _train_step(engine, batches, loss_fn, grad_accum: int, phases: PhaseTimer) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss (no host sync)."""
    total = torch.zeros((), device=engine.device)
    phases.restart()  # the loop's own bookkeeping since the last step is no phase of this one
    for _ in range(grad_accum):
        batch = to_device(next(batches), engine.device)
        phases.mark("data")
        loss = loss_fn(engine, batch)
        phases.mark("forward")
        engine.backward(loss)
        phases.mark("backward")
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        phases.mark("optimizer")
        total += loss.detach().float()
    return total / grad_accum


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


class Window:
    """Loss and wall time since the last log line; time spent validating or saving is left out."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.start = time.perf_counter()
        self.train_seconds = 0.0  # over the whole run, the first window (start-up) excluded
        self.train_steps = 0
        self.flushes = 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def flush(self) -> tuple[float, int, float]:
        loss = distributed.all_mean([self.loss_sum.item() / self.steps], self.device)[0]
        seconds, steps = time.perf_counter() - self.start, self.steps
        if self.flushes:
            self.train_seconds += seconds
            self.train_steps += steps
        self.flushes += 1
        self.loss_sum.zero_()
        self.steps = 0
        self.start = time.perf_counter()
        return loss, steps, seconds

    def exclude_since_last(self) -> None:
        self.start = time.perf_counter()


def _write_summary(cfg: Config, state, final_loss: float, validated: dict, window: Window) -> None:
    """summary.json: where the run ended. Throughput covers this launch, start-up excluded."""
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    summary = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "final_loss": final_loss,
        **{name.replace("/", "_"): value for name, value in validated.items()},  # val_loss, test_accuracy, ...
        "best_checkpoint": str(checkpoint.checkpoints_dir(cfg.run_dir) / checkpoint.tag_of(state.best_step))
        if state.best_step else None,
        "tokens_per_s": window.train_steps * tokens_per_step / window.train_seconds if window.train_seconds else None,
        "checkpoint": str(checkpoint.checkpoints_dir(cfg.run_dir) / checkpoint.latest_tag(cfg.run_dir)),
        "tensorboard": str(cfg.run_dir / "tensorboard"),
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


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
