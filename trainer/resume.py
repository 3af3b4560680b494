"""Resuming a run: which checkpoint it continues from, and how that checkpoint loads onto these ranks.

One decision serves the launcher's pre-flight (`decide`: sizes only, before any rank starts) and the ranks
(`choose`: checksums verified and any universal conversion made, each rank its share, before the engine is
built): the newest intact checkpoint; whether it was saved by another number of ranks (their RNG and stream states do not map onto
these); and whether ZeRO partitioned its optimizer state, which then loads through DeepSpeed's universal
(world-size free) format.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.files import fsync_dir
from trainer import checkpoint, universal
from trainer.checkpoint import PARTIAL, TrainState, checkpoints_dir, universal_dir
from trainer.config import Config, ConfigError, dotted, load_config, short


@dataclass(frozen=True)
class Layout:
    """How a run's ranks are laid out: how many, and in sequence or tensor groups (parallel.*)."""

    ranks: int
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def of(cls, cfg: Config) -> "Layout":
        return cls(cfg.world_size, cfg.parallel.sequence, cfg.parallel.tensor)

    def same_files(self, other: "Layout") -> bool:
        """Whether DeepSpeed's files fit: a rank's ZeRO partition and tensor slice depend on these two (the
        sequence groups are invisible to DeepSpeed)."""
        return (self.ranks, self.tensor) == (other.ranks, other.tensor)

    def __str__(self) -> str:
        groups = "".join(f", parallel.{name} {n}" for name, n in (("sequence", self.sequence),
                                                                  ("tensor", self.tensor)) if n > 1)
        return f"{self.ranks} rank{'s' * (self.ranks > 1)}{groups}"


@dataclass(frozen=True)
class ResumePoint:
    tag: str
    saved: Layout
    other_ranks: bool  # saved by other ranks, or laid out otherwise: their RNG and stream states do not map
    universal: bool  # ... and DeepSpeed's files do not fit these ranks: load its universal conversion
    damaged: tuple[str, ...] = ()  # newer checkpoints passed over, and why

    def folder(self, run_dir: Path) -> Path:
        return checkpoints_dir(run_dir) / self.tag


def decide(run_dir: Path, now: Layout, checksums: bool) -> ResumePoint | None:
    """The checkpoint a resumed run laid out as `now` starts from; None when the run has none. Checkpoints
    that are all damaged are refused."""
    if not checkpoint.saved_tags(checkpoints_dir(run_dir)):
        return None
    found = checkpoint.find(run_dir, checksums)
    if found.tag is None:
        raise ConfigError(f"run.output_dir: no intact checkpoint in {checkpoints_dir(run_dir)} to resume from "
                          f"({found.damaged[0]})")
    return _point(checkpoints_dir(run_dir), found.tag, now, found.damaged)


def _point(root: Path, tag: str, now: Layout, damaged) -> ResumePoint:
    folder = root / tag
    saved = saved_layout(folder)
    convert = not saved.same_files(now) and partitioned(folder)
    if saved.tensor != now.tensor and not convert:
        raise ConfigError(f"parallel.tensor: checkpoint {tag} was saved at ZeRO stage 0 with parallel.tensor "
                          f"{saved.tensor}; DeepSpeed loads its optimizer state (kept in the model files) at that "
                          f"degree only: resume with parallel.tensor {saved.tensor}")
    return ResumePoint(tag, saved, saved != now, convert, tuple(damaged))


def choose(run_dir: Path, now: Layout, log, group) -> ResumePoint | None:
    """Collective over `group` (gloo, with a timeout for long work), before the engine is built: the newest
    checkpoint whose checksums the ranks verify, each its share of the bytes; saved by another number of ranks
    with ZeRO partitions, the ranks convert it to a universal one together. Every rank reaches the same
    decision from the gathered results."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    root, damaged = checkpoints_dir(run_dir), []
    for tag in sorted(checkpoint.saved_tags(root), reverse=True):
        folder = root / tag
        log(f"verifying checkpoint {tag}: {checkpoint.manifest_bytes(folder) / 2**30:.2f} GiB, each of the "
            f"{world} ranks checksumming its share")
        started = time.perf_counter()
        problems = [None] * world
        dist.all_gather_object(problems, checkpoint.verify(folder, checksums=True, part=(rank, world)), group=group)
        problem = next((p for p in problems if p), None)
        if problem is None:
            log(f"checkpoint {tag} verified in {time.perf_counter() - started:.1f} s")
            break
        damaged.append(f"{tag} is damaged ({problem})")
        log(f"checkpoint {damaged[-1]}: falling back to an older one")
    else:
        if damaged:
            raise ConfigError(f"run.output_dir: no intact checkpoint in {root} to resume from ({damaged[0]})")
        return None
    point = _point(root, tag, now, damaged)
    if point.universal and not universal_dir(root, tag).exists():
        started = time.perf_counter()
        convert_to_universal(run_dir, tag, group, log)
        log(f"converted {tag} to a universal checkpoint in {time.perf_counter() - started:.1f} s")
    return point


def read_position(run_dir: Path, point: ResumePoint) -> tuple[TrainState, dict | None]:
    """Before the engine exists: the run's position, and this rank's own saved state (RNG states and stream
    position) when the ranks are the same ones, else None."""
    folder = point.folder(run_dir)
    return checkpoint.read_state(folder), None if point.other_ranks else checkpoint.read_rank_state(folder)


def load_engine(engine, run_dir: Path, point: ResumePoint) -> None:
    """Weights, optimizer and ZeRO partitions, LR schedule: directly, or through the universal conversion."""
    root = checkpoints_dir(run_dir)
    weight_decays = [group["weight_decay"] for group in engine.optimizer.param_groups]
    checkpoint.load_engine(engine, root, universal_dir(root, point.tag).name if point.universal else point.tag)
    if point.universal:
        _repair_zero3_universal_load(engine, weight_decays)


def _repair_zero3_universal_load(engine, weight_decays: list[float]) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load copies group 0's hyper-parameters onto every group (weight decay
    for norms and biases) and gives all groups one shared Adam step tensor (which each group's update then
    increments: the bias correction runs ahead). Measured: loss drift 4e-3 three steps after resuming."""
    for group, weight_decay in zip(engine.optimizer.param_groups, weight_decays, strict=True):
        group["weight_decay"] = weight_decay
    for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def saved_layout(folder: Path) -> Layout:
    parallel = load_config(folder / "config.yaml").parallel
    return Layout(len(list(folder.glob("rank*.pt"))), parallel.sequence, parallel.tensor)


def partitioned(folder: Path) -> bool:
    """Whether ZeRO split the optimizer state over the ranks (stage 0 saves it whole: loads on any number)."""
    return any(folder.glob("*zero_pp_rank_*"))


def convert_to_universal(run_dir: Path, tag: str, group, log) -> Path:
    """Collective over `group`: DeepSpeed's universal checkpoint of `tag`, which loads on any number of ranks,
    made once beside it by all ranks together (trainer.universal), into a folder renamed when complete."""
    root = checkpoints_dir(run_dir)
    out = universal_dir(root, tag)
    tmp = out.with_name(out.name + PARTIAL)
    if dist.get_rank(group) == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
    dist.barrier(group)
    # the cores of this node, shared by its ranks (the engine does not exist yet: the memory is free)
    workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    universal.convert(root / tag, tmp, group, log, workers)
    if dist.get_rank(group) == 0:
        tmp.rename(out)
        fsync_dir(root)
    dist.barrier(group)
    return out


# What a resume may change: where the run lives, how fast it learns from here, how long it trains, how it logs,
# evaluates, checkpoints and launches, memory- and speed-only switches. Everything else must equal the checkpoint's.
MAY_CHANGE = ("run.name", "run.output_dir", "model.init_from", "model.gradient_checkpointing", "model.attention",
              "optim.", "train.micro_batch_size", "train.global_batch_size", "train.max_steps", "train.log_every",
              "train.max_nonfinite_steps", "train.loss_chunk_tokens", "train.compile", "eval.", "checkpoint.",
              "launch.", "zero.nvme_path",
              "zero.partitioned_init", "data.num_workers", "data.prepared_dir", "parallel.")
# What the data is (files, tokenizer, splits): judged by the data's fingerprint, which --allow-data-change
# overrides; the same data may be described differently (moved, another spelling of a path).
DATA = ("data.", "tokenizer.")
# ... except the sample length (the consumed-sample count, the run's position in the data, counts samples of it)
# and whether a sample's documents are kept apart (what the model learns from them).
NEVER = ("data.seq_len", "data.mode", "data.document_masking")


def config_changes(saved: Config, new: Config) -> list[str]:
    """The keys that differ between a checkpoint's config and the config resuming it and may not, as
    `key old -> new`."""
    old, now = dotted(saved.model_dump(mode="json")), dotted(new.model_dump(mode="json"))
    changed = []
    for key in sorted(set(old) | set(now)):
        if old.get(key) == now.get(key) or key.startswith(MAY_CHANGE):
            continue
        if key.startswith(DATA) and key not in NEVER:
            continue
        changed.append(f"{key} {short(old.get(key))} -> {short(now.get(key))}")
    return changed


def check_continues(cfg: Config, point: ResumePoint, state: TrainState, vocab_size: int) -> None:
    """Refuse, in one line, a config that cannot continue the checkpoint: changed architecture, seed, precision,
    sample length..., a vocabulary of another size, a global batch that does not divide the samples consumed,
    or max_steps behind it."""
    folder = point.folder(cfg.run_dir)
    changes = config_changes(load_config(folder / "config.yaml"), cfg)
    if changes:
        raise ConfigError(f"checkpoint {point.tag} was trained with other settings that cannot change on resume: "
                          f"{'; '.join(changes)}; resume with the checkpoint's values or start another "
                          "run.output_dir")
    if state.vocab_size and state.vocab_size != vocab_size:
        raise ConfigError(f"tokenizer: the data's vocabulary has {vocab_size} tokens, the model of checkpoint "
                          f"{point.tag} {state.vocab_size}; resume with its tokenizer")
    if state.consumed_samples % cfg.train.global_batch_size:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} does not divide the "
                          f"{state.consumed_samples} samples checkpoint {point.tag} consumed; choose a divisor")
    if cfg.train.max_steps < state.step:
        raise ConfigError(f"train.max_steps: {cfg.train.max_steps} is below the step of checkpoint {point.tag} "
                          f"({state.step}); raise it to train on, or export the checkpoint")

