"""Checkpoints on disk: DeepSpeed's sharded engine state, the run's position, and each rank's own state.

Layout: RUN_DIR/checkpoints/step_00000100/ holds the engine's (DeepSpeed's) shards, `train_state.json` (step,
samples consumed, data fingerprint, the parallel layout that saved it), `config.yaml` (the config it was trained
with) and `rank{R}.pt` (each rank's RNG states, and its stream position in streaming mode);
RUN_DIR/checkpoints/latest names the newest one, and RUN_DIR/checkpoints/best the one with the best validation
result (`eval.best_metric`), which retention keeps.

A save is atomic: every rank writes into `step_N.partial/` and fsyncs what it wrote (trainer/checkpointing/writer.py:
in the background, hashing the bytes as they are written); only when all have, rank 0 writes `manifest.json`
(each file's size and SHA-256), renames the folder to `step_N/` and then points `latest` at it. A job killed at
any moment leaves the previous checkpoint intact; a leftover `.partial` folder is never loaded. Every reader (the
pre-flight, the resuming ranks, export, status, the final test) takes a checkpoint only if it matches its
manifest: `find_intact` is the one routine that looks for it, each reader verifying as far as it needs (sizes,
checksums, by all ranks) - and the files it parses are checksummed before they are parsed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.errors import UserError
from data_pipeline.files import file_sha256, fsync_dir, fsync_tree, share, write_durable
from trainer import run_files

if TYPE_CHECKING:
    from trainer.checkpointing.writer import Writer
    from trainer.engine import Engine

LATEST = "latest"
BEST = "best"
PARTIAL = ".partial"
UNIVERSAL = ".universal"  # beside step_N: its conversion to a DeepSpeed universal checkpoint (any world size)
MANIFEST = "manifest.json"  # every file of the checkpoint with its size and SHA-256
STATE, CONFIG = "train_state.json", "config.yaml"
PARSED = (STATE, CONFIG)  # what readers parse: checksummed before any reader does
REQUIRED = (*PARSED, "rank0.pt")  # besides the engine's model files, in every checkpoint
TAG = re.compile(r"step_\d{8,}")


@dataclass(frozen=True)
class TrainState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0  # global, world-size independent position in the data order
    tokens_seen: int = 0
    data_fingerprint: str = ""
    vocab_size: int = 0  # of the model's embeddings: 0 in checkpoints that did not record it
    best_value: float | None = None  # of eval.best_metric, at best_step
    best_step: int = 0
    evals_since_best: int = 0  # validations without improvement (early stopping counts them)
    layout: dict = field(default_factory=dict)  # the ParallelLayout that saved it ({} in checkpoints before it)
    base_fingerprint: str = ""  # of model.init_from's weights, under model.lora (trainer/model/lora.py)

    def advanced(self, samples: int, tokens: int) -> "TrainState":
        return replace(self, step=self.step + 1, consumed_samples=self.consumed_samples + samples,
                       tokens_seen=self.tokens_seen + tokens)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def universal_dir(root: Path, tag: str) -> Path:
    return root / (tag + UNIVERSAL)


def pointer(run_dir: Path, name: str) -> str | None:
    """The checkpoint `latest` or `best` names; None when missing, or when it names no checkpoint folder (a
    pointer is written atomically, so that is damage, not a save in progress)."""
    path = checkpoints_dir(run_dir) / name
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if TAG.fullmatch(tag) and (checkpoints_dir(run_dir) / tag).is_dir() else None


def mark_best(run_dir: Path, tag: str) -> None:
    """Rank 0, after `tag` was saved: it holds the best validation result so far."""
    write_durable(checkpoints_dir(run_dir) / BEST, tag)


def read_state(folder: Path) -> TrainState:
    """The checkpoint's train_state.json; a checkpoint's reader has verified it (`verify` checksums the files it
    parses even when it checks sizes only)."""
    return run_files.read(folder / STATE, TrainState)


def save(engine: Engine, run_dir: Path, state: TrainState, stream_state: dict | None, writer: Writer, group,
         retention: tuple[int, int], on_commit: Callable[[str], None] = lambda tag: None) -> str:
    """Collective: every rank calls it. Returns the tag. With an asynchronous writer it returns once the state
    is copied to host memory; the save commits in the writer's thread when every rank's files are durable
    (`group`: the ranks' gloo group for that). `retention`: (keep_last, keep_every). `on_commit(tag)` runs on
    rank 0 once the checkpoint is complete."""
    root = checkpoints_dir(run_dir)
    tag = tag_of(state.step)
    partial = root / (tag + PARTIAL)
    writer.begin(partial)  # waits for the save in flight: its partial folder is another one
    if dist.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    dist.barrier()
    engine.save(root, partial.name, writer)
    writer.add({"rng": _rng_states(), "stream": stream_state}, partial / f"rank{dist.get_rank()}.pt")
    config = (run_dir / "config.yaml").read_text() if dist.get_rank() == 0 else None
    writer.commit(lambda digests: _commit(run_dir, tag, state, config, digests, group, retention, on_commit))
    return tag


def _commit(run_dir: Path, tag: str, state: TrainState, config: str | None, digests: dict, group,
            retention: tuple[int, int], on_commit: Callable[[str], None]) -> None:
    """Every rank's files are written and fsynced: rank 0 writes the manifest, renames the folder, moves
    `latest` and applies retention. Collective over `group`."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, digests, group=group)
    if dist.get_rank(group) == 0:
        root = checkpoints_dir(run_dir)
        partial = root / (tag + PARTIAL)
        write_durable(partial / STATE, json.dumps(asdict(state), indent=2))
        write_durable(partial / CONFIG, config)
        files = {name: d for part in everyone for name, d in part.items()}
        for path in sorted(p for p in partial.rglob("*") if p.is_file()):  # written by others than the writer
            name = str(path.relative_to(partial))
            if name not in files:
                files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        write_durable(partial / MANIFEST, json.dumps(files, indent=1, sort_keys=True))
        fsync_tree(partial)
        if (root / tag).exists():  # a checkpoint of this step saved before a crash and a resume
            shutil.rmtree(root / tag)
        partial.rename(root / tag)
        fsync_dir(root)
        write_durable(root / LATEST, tag)
        on_commit(tag)
        _apply_retention(root, *retention, pointer(run_dir, BEST))
    dist.barrier(group)


def read_rank_state(folder: Path) -> dict:
    """This rank's own part of a checkpoint saved by the same ranks: {"rng": its RNG states (for
    `set_rng_states`), "stream": its stream position or None}."""
    return torch.load(folder / f"rank{dist.get_rank()}.pt", weights_only=False)


def load_weights(engine: Engine, run_dir: Path, step: int) -> None:
    """Collective: only the weights of a saved step (the final test of the best checkpoint), once it is verified."""
    tag = tag_of(step)
    problem = verify(checkpoints_dir(run_dir) / tag, checksums=True)
    if problem:
        raise RuntimeError(f"checkpoint {tag} is damaged ({problem}); its weights cannot be tested")
    engine.load(checkpoints_dir(run_dir), tag, weights_only=True)


@dataclass(frozen=True)
class Found:
    """A checkpoint a reader may take (None if none), and what is wrong with the newer or named ones."""

    tag: str | None
    damaged: list[str] = field(default_factory=list)


def find_intact(run_dir: Path, check: Callable[[Path], str | None], tag: str | None = None,
                newest: str | None = None) -> Found:
    """The checkpoint `tag` if `check` finds nothing wrong with it; without a tag the newest that passes (not
    newer than `newest`). `check(folder)`: None, or what is wrong - `sizes`, `checksums`, or the ranks
    checksumming together (trainer/checkpointing/resume.py)."""
    root = checkpoints_dir(run_dir)
    candidates = [tag] if tag else [t for t in sorted(saved_tags(root), reverse=True) if newest is None or t <= newest]
    damaged = []
    for candidate in candidates:
        problem = check(root / candidate)
        if problem is None:
            return Found(candidate, damaged)
        damaged.append(f"{candidate} is damaged ({problem})")
    return Found(None, damaged)


def verify(folder: Path, checksums: bool, part: tuple[int, int] = (0, 1)) -> str | None:
    """None when every file of the manifest is there with its size and checksum; else the first problem. Without
    `checksums`, sizes only - but the small files a reader parses (train_state.json, config.yaml) are checksummed
    anyway. `part` (rank, world size): checksum only that rank's share of the bytes, the ranks verifying in
    parallel. A manifest that lacks a file every checkpoint has is damage too."""
    try:
        manifest = run_files.read(folder / MANIFEST, run_files.Manifest).root
    except UserError as e:
        return str(e)
    missing = [name for name in REQUIRED if name not in manifest] + \
        ([] if any(name.endswith("model_states.pt") for name in manifest) else ["a *model_states.pt file"])
    if missing:
        return f"{folder / MANIFEST} does not list {missing[0]}"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected.bytes:
            return f"{path} has {path.stat().st_size} bytes, expected {expected.bytes}"
    mine = share(sorted(manifest), *part, size=lambda name: manifest[name].bytes) if checksums else PARSED
    for name in mine:
        if file_sha256(folder / name) != manifest[name].sha256:
            return f"{folder / name} fails its checksum"
    return None


sizes = partial(verify, checksums=False)  # every file of the manifest there, of its size
checksums = partial(verify, checksums=True)  # ... and of its content


def manifest_bytes(folder: Path) -> int:
    try:
        return sum(entry.bytes for entry in run_files.read(folder / MANIFEST, run_files.Manifest).root.values())
    except UserError:
        return 0


def saved_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if p.is_dir() and TAG.fullmatch(p.name))


def _apply_retention(root: Path, keep_last: int, keep_every: int, best: str | None) -> None:
    """Keep the newest `keep_last` checkpoints, every `keep_every`-th step's as a milestone, and the best."""
    for old in saved_tags(root)[:-keep_last]:
        if old != best and not (keep_every and step_of(old) % keep_every == 0):
            shutil.rmtree(root / old)
            shutil.rmtree(universal_dir(root, old), ignore_errors=True)


def _rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
