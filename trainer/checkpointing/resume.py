"""Resuming a run: which checkpoint it continues from, and how that checkpoint loads onto these ranks.

The pre-flight decides (`decide`, before any rank starts): the newest checkpoint whose files are all there,
whether the layout that saved it is this run's (else its RNG and stream states do not map onto these ranks),
and whether ZeRO partitioned its state over other ranks (then it loads through DeepSpeed's universal,
world-size free, conversion). The ranks act on that decision (`at_ranks`): they checksum its files together -
falling back to an older checkpoint, through the same routine, should a byte have rotted - and make the
conversion it needs, each rank its share.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from data_pipeline.files import fsync_dir
from trainer.checkpointing import store
from trainer.checkpointing.store import PARTIAL, UNIVERSAL, TrainState, checkpoints_dir, universal_dir
from trainer.config import Config, ConfigError, load_config, resume_changes
from trainer.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class ResumePoint:
    tag: str
    saved: ParallelLayout
    other_ranks: bool  # saved by other ranks, or laid out otherwise: their RNG and stream states do not map
    universal: bool  # ... and DeepSpeed's files do not fit these ranks: load its universal conversion
    damaged: tuple[str, ...] = ()  # newer checkpoints passed over, and why

    def folder(self, run_dir: Path) -> Path:
        return checkpoints_dir(run_dir) / self.tag


def decide(run_dir: Path, now: ParallelLayout, check=store.sizes, newest: str | None = None) -> ResumePoint | None:
    """The checkpoint a resumed run laid out as `now` starts from (the newest that `check` passes, not newer than
    `newest`); None when the run has none. Checkpoints that are all damaged are refused."""
    if not store.saved_tags(checkpoints_dir(run_dir)):
        return None
    found = store.find_intact(run_dir, check, newest=newest)
    if found.tag is None:
        raise ConfigError(f"run.output_dir: no intact checkpoint in {checkpoints_dir(run_dir)} to resume from "
                          f"({found.damaged[0]})")
    return point(run_dir, found.tag, now, found.damaged)


def point(run_dir: Path, tag: str, now: ParallelLayout, damaged=()) -> ResumePoint:
    """How checkpoint `tag` loads onto ranks laid out as `now`."""
    folder = checkpoints_dir(run_dir) / tag
    saved = saved_layout(folder)
    convert = not saved.same_files(now) and partitioned(folder)
    if saved.tensor != now.tensor and not convert:
        raise ConfigError(f"parallel.tensor: checkpoint {tag} was saved at ZeRO stage 0 with parallel.tensor "
                          f"{saved.tensor}; DeepSpeed loads its optimizer state (kept in the model files) at that "
                          f"degree only: resume with parallel.tensor {saved.tensor}")
    if saved.expert > 1 and not saved.same_files(now) and not convert:  # nothing to convert AutoEP's experts from
        raise ConfigError(f"parallel.expert: checkpoint {tag} was saved at ZeRO stage 0 by {saved}; its experts "
                          f"load on that layout only: resume on {saved.world} ranks with parallel.expert "
                          f"{saved.expert}")
    return ResumePoint(tag, saved, saved != now, convert, tuple(damaged))


def at_ranks(run_dir: Path, tag: str, now: ParallelLayout, log, group) -> ResumePoint:
    """Collective over `group` (gloo, with a timeout for long work), before the engine is built: the pre-flight's
    checkpoint `tag`, once the ranks have checksummed it together (each its share of the bytes), or the newest
    older one that passes; converted to a universal checkpoint by all of them if it needs to be."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def together(folder: Path) -> str | None:
        log(f"verifying checkpoint {folder.name}: {store.manifest_bytes(folder) / 2**30:.2f} GiB, each of the "
            f"{world} ranks checksumming its share")
        started = time.perf_counter()
        problems = [None] * world
        dist.all_gather_object(problems, store.verify(folder, checksums=True, part=(rank, world)), group=group)
        problem = next((p for p in problems if p), None)
        log(f"checkpoint {folder.name} " + (f"verified in {time.perf_counter() - started:.1f} s" if problem is None
                                            else f"is damaged ({problem}): falling back to an older one"))
        return problem

    resume = decide(run_dir, now, together, newest=tag)
    if resume.universal and not universal_dir(checkpoints_dir(run_dir), resume.tag).exists():
        started = time.perf_counter()
        convert_to_universal(run_dir, resume.tag, group, log)
        log(f"converted {resume.tag} to a universal checkpoint in {time.perf_counter() - started:.1f} s")
    return resume


def read_position(run_dir: Path, resume: ResumePoint) -> tuple[TrainState, dict | None]:
    """Before the engine exists: the run's position, and this rank's own saved state (RNG states and stream
    position) when the ranks are laid out as they were, else None."""
    folder = resume.folder(run_dir)
    return store.read_state(folder), None if resume.other_ranks else store.read_rank_state(folder)


def load_tag(resume: ResumePoint) -> str:
    """What the engine loads: the checkpoint, or its universal conversion."""
    return resume.tag + UNIVERSAL if resume.universal else resume.tag


def saved_layout(folder: Path) -> ParallelLayout:
    """The layout that saved a checkpoint, as its train_state.json records it. Checkpoints written before it
    did: their config's parallel degrees and their count of rank files."""
    recorded = store.read_state(folder).layout
    if recorded:
        return ParallelLayout.from_dict(recorded)
    parallel = load_config(folder / "config.yaml").parallel
    return ParallelLayout(len(list(folder.glob("rank*.pt"))), parallel.sequence, parallel.tensor)


def partitioned(folder: Path) -> bool:
    """Whether ZeRO split the optimizer state over the ranks (stage 0 saves it whole: loads on any number)."""
    return any(folder.glob("*zero_pp_rank_*"))


def convert_to_universal(run_dir: Path, tag: str, group, log) -> Path:
    """Collective over `group`: DeepSpeed's universal checkpoint of `tag`, which loads on any number of ranks,
    made once beside it by all ranks together (trainer.engine.universal), into a folder renamed when complete."""
    from trainer.engine import universal

    root = checkpoints_dir(run_dir)
    out = universal_dir(root, tag)
    tmp = out.with_name(out.name + PARTIAL)
    if dist.get_rank(group) == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
    dist.barrier(group)
    # the cores of this node, shared by its ranks (the engine does not exist yet: the memory is free)
    workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if saved_layout(root / tag).expert > 1:  # AutoEP's experts: DeepSpeed's own (serial) conversion gathers them
        if dist.get_rank(group) == 0:
            universal.convert_here(root / tag, tmp)
    else:
        universal.convert(root / tag, tmp, group, log, workers)
    if dist.get_rank(group) == 0:
        tmp.rename(out)
        fsync_dir(root)
    dist.barrier(group)
    return out


def _check_same_adapters(saved: Config, cfg: Config, tag: str, state: TrainState) -> None:
    """A LoRA run continues with adapters on the same base model; a full fine-tune without them."""
    from trainer.model.lora import base_of

    if (saved.model.lora is None) != (cfg.model.lora is None):
        trained = "without model.lora (all weights trained)" if saved.model.lora is None else \
            "with LoRA adapters (model.lora)"
        raise ConfigError(f"model.lora: checkpoint {tag} was trained {trained}; resume with its setting, or start "
                          "another run.output_dir (init_from an export of it)")
    if cfg.model.lora is not None and state.base_fingerprint != base_of(cfg.model):
        raise ConfigError(f"model.init_from: {cfg.model.init_from} is not the base model checkpoint {tag} trained "
                          f"its adapters on (weights fingerprint {state.base_fingerprint or 'none'}, here "
                          f"{base_of(cfg.model) or 'none'}); resume with model.init_from: {saved.model.init_from}")


def check_continues(cfg: Config, resume: ResumePoint, state: TrainState, vocab_size: int) -> None:
    """Refuse, in one line, a config that cannot continue the checkpoint: a field that may not change on resume
    (the config schema says which), a vocabulary of another size, a global batch that does not divide the
    samples consumed, or max_steps behind it."""
    folder = resume.folder(cfg.run_dir)
    saved = load_config(folder / "config.yaml")
    _check_same_adapters(saved, cfg, resume.tag, state)
    if (saved.parallel.expert > 1) != (cfg.parallel.expert > 1):  # AutoEP renames and splits the experts' weights
        raise ConfigError(f"parallel.expert: checkpoint {resume.tag} was trained with parallel.expert "
                          f"{saved.parallel.expert}, and DeepSpeed cannot load expert-parallel weights into a model "
                          "without it or the reverse; resume with expert parallelism "
                          f"{'on' if saved.parallel.expert > 1 else 'off'} (any degree), or init_from an export")
    changes = resume_changes(saved, cfg)
    if changes:
        raise ConfigError(f"checkpoint {resume.tag} was trained with other settings that cannot change on resume: "
                          f"{'; '.join(changes)}; resume with the checkpoint's values or start another "
                          "run.output_dir")
    if state.vocab_size and state.vocab_size != vocab_size:
        raise ConfigError(f"tokenizer: the data's vocabulary has {vocab_size} tokens, the model of checkpoint "
                          f"{resume.tag} {state.vocab_size}; resume with its tokenizer")
    if state.consumed_samples % cfg.train.global_batch_size:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} does not divide the "
                          f"{state.consumed_samples} samples checkpoint {resume.tag} consumed; choose a divisor")
    if cfg.train.max_steps < state.step:
        raise ConfigError(f"train.max_steps: {cfg.train.max_steps} is below the step of checkpoint {resume.tag} "
                          f"({state.step}); raise it to train on, or export the checkpoint")
