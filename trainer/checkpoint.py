"""Checkpoints: DeepSpeed's sharded engine state, the run's position, and each rank's own state.

Layout: RUN_DIR/checkpoints/step_00000100/ holds the DeepSpeed shards, `train_state.json` (step, samples
consumed, data fingerprint), `config.yaml` (the config it was trained with) and `rank{R}.pt` (each rank's
RNG states, and its stream position in streaming mode); RUN_DIR/checkpoints/latest names the newest one, and RUN_DIR/checkpoints/best the one with the best
validation result (`train.best_metric`), which retention keeps.

A save is atomic: every rank writes into `step_N.partial/` and fsyncs what it wrote; only when all have,
rank 0 writes `manifest.json` (each file's size and SHA-256, hashed by all ranks in parallel), renames the
folder to `step_N/` and then points `latest` at it. A job killed at any moment leaves the previous
checkpoint intact; a leftover `.partial` folder is never loaded. Resuming takes the newest checkpoint that
matches its manifest, saying which newer ones are damaged and why.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import file_sha256

LATEST = "latest"
BEST = "best"
PARTIAL = ".partial"
UNIVERSAL = ".universal"
MANIFEST = "manifest.json"  # every file of the checkpoint with its size and SHA-256
EXIT_SAVED = 3  # a rank's (and the launcher's) exit code when a stop signal ended the run after a save


@dataclass(frozen=True)
class TrainState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0  # global, world-size independent position in the data order
    tokens_seen: int = 0
    data_fingerprint: str = ""
    best_value: float | None = None  # of train.best_metric, at best_step
    best_step: int = 0
    evals_since_best: int = 0  # validations without improvement (early stopping counts them)

    def advanced(self, samples: int, tokens: int) -> "TrainState":
        return replace(self, step=self.step + 1, consumed_samples=self.consumed_samples + samples,
                       tokens_seen=self.tokens_seen + tokens)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    return _pointer(run_dir, LATEST)


def best_tag(run_dir: Path) -> str | None:
    return _pointer(run_dir, BEST)


def _pointer(run_dir: Path, name: str) -> str | None:
    pointer = checkpoints_dir(run_dir) / name
    return pointer.read_text().strip() if pointer.is_file() else None


def mark_best(run_dir: Path, tag: str) -> None:
    """Rank 0, after `tag` was saved: it holds the best validation result so far."""
    _write_durable(checkpoints_dir(run_dir) / BEST, tag)


def read_state(run_dir: Path, tag: str) -> TrainState:
    return TrainState(**json.loads((checkpoints_dir(run_dir) / tag / "train_state.json").read_text()))


def save(engine, run_dir: Path, state: TrainState, stream_state: dict | None, keep_last: int,
         keep_every: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = checkpoints_dir(run_dir)
    tag = tag_of(state.step)
    partial = root / (tag + PARTIAL)
    if dist.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    torch.save({"rng": _rng_states(), "stream": stream_state}, partial / f"rank{dist.get_rank()}.pt")
    _fsync_tree(partial)  # each rank flushes what it wrote, also on a shared filesystem
    dist.barrier()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _digests(partial, dist.get_rank(), dist.get_world_size()))
    if dist.get_rank() == 0:
        _write_durable(partial / "train_state.json", json.dumps(asdict(state), indent=2))
        shutil.copyfile(run_dir / "config.yaml", partial / "config.yaml")
        files = {name: d for part in digests for name, d in part.items()}
        files.update({name: _digest(partial / name) for name in ("train_state.json", "config.yaml")})
        _write_durable(partial / MANIFEST, json.dumps(files, indent=1, sort_keys=True))
        _fsync_tree(partial)
        if (root / tag).exists():  # a checkpoint of this step saved before a crash and a resume
            shutil.rmtree(root / tag)
        os.rename(partial, root / tag)
        _write_durable(root / LATEST, tag)
        _apply_retention(root, keep_last, keep_every, best_tag(run_dir))
    dist.barrier()
    return root / tag


@dataclass(frozen=True)
class Resume:
    """The checkpoint a resumed run starts from, chosen by rank 0 before the engine is built."""

    tag: str
    other_ranks: bool  # saved by another number of ranks: their RNG and stream states do not map onto these
    universal: bool  # ... and partitioned by ZeRO: load its universal (world-size free) conversion


def choose(run_dir: Path, log) -> Resume | None:
    """Collective. The newest checkpoint that rank 0 finds intact (checksums verified); None without one.
    Saved by another number of ranks with ZeRO partitions, rank 0 first converts it to a universal one."""
    choice = [None]
    if dist.get_rank() == 0:
        tag, damaged = newest_intact(run_dir, checksums=True)
        for problem in damaged:
            log(f"checkpoint {problem}: falling back to an older one")
        if tag is not None:
            other_ranks = saved_world_size(run_dir, tag) != dist.get_world_size()
            choice = [Resume(tag, other_ranks, other_ranks and partitioned(run_dir, tag))]
            if choice[0].universal:
                log(f"checkpoint {tag}: converting its ZeRO partitions to a universal checkpoint")
                convert_to_universal(run_dir, tag)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def load(engine, run_dir: Path, resume: Resume) -> tuple[TrainState, dict | None]:
    """Restore the engine, and this rank's RNG when the ranks are the same ones. Returns the run's position
    and this rank's stream state."""
    root = checkpoints_dir(run_dir)
    weight_decays = [group["weight_decay"] for group in engine.optimizer.param_groups]
    engine.load_checkpoint(str(root), tag=resume.tag + UNIVERSAL if resume.universal else resume.tag)
    if resume.universal:
        _repair_zero3_universal_load(engine, weight_decays)
    if resume.other_ranks:
        return read_state(run_dir, resume.tag), None
    own = torch.load(root / resume.tag / f"rank{dist.get_rank()}.pt", weights_only=False)
    _set_rng_states(own["rng"])
    return read_state(run_dir, resume.tag), own["stream"]


def _repair_zero3_universal_load(engine, weight_decays: list[float]) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load copies group 0's hyper-parameters onto every group (weight decay
    for norms and biases) and gives all groups one shared Adam step tensor (which each group's update then
    increments: the bias correction runs ahead). Measured: loss drift 4e-3 three steps after resuming."""
    for group, weight_decay in zip(engine.optimizer.param_groups, weight_decays, strict=True):
        group["weight_decay"] = weight_decay
    for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def saved_world_size(run_dir: Path, tag: str) -> int:
    return len(list((checkpoints_dir(run_dir) / tag).glob("rank*.pt")))


def partitioned(run_dir: Path, tag: str) -> bool:
    """Whether ZeRO split the optimizer state over the ranks (stage 0 saves it whole: loads on any number)."""
    return any((checkpoints_dir(run_dir) / tag).glob("*zero_pp_rank_*"))


def convert_to_universal(run_dir: Path, tag: str) -> Path:
    """DeepSpeed's universal checkpoint of `tag`, which loads on any number of ranks (made once, beside it)."""
    root = checkpoints_dir(run_dir)
    out = root / (tag + UNIVERSAL)
    if not out.exists():
        tmp = root / (tag + UNIVERSAL + PARTIAL)
        shutil.rmtree(tmp, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(root / tag), "--output_folder", str(tmp), "--inject_missing_state"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ds_to_universal failed on {root / tag}:\n{done.stderr[-3000:]}")
        os.rename(tmp, out)
    return out


def newest_intact(run_dir: Path, checksums: bool) -> tuple[str | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and what is wrong with the newer ones."""
    damaged = []
    for tag in sorted(saved_tags(checkpoints_dir(run_dir)), reverse=True):
        problem = verify(checkpoints_dir(run_dir) / tag, checksums)
        if problem is None:
            return tag, damaged
        damaged.append(f"{tag} is damaged ({problem})")
    return None, damaged


def verify(folder: Path, checksums: bool) -> str | None:
    """None when every file of the manifest is there with its size (and checksum); else the first problem."""
    if not (folder / MANIFEST).is_file():
        return f"{folder / MANIFEST} is missing"
    for name, expected in json.loads((folder / MANIFEST).read_text()).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if checksums and _digest(path)["sha256"] != expected["sha256"]:
            return f"{path} fails its checksum"
    return None


def saved_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name))


def _digests(folder: Path, rank: int, world_size: int) -> dict:
    """This rank's share of the checksums: every world_size-th file, so all ranks hash in parallel."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return {name: _digest(folder / name) for name in names[rank::world_size]}


def _digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _apply_retention(root: Path, keep_last: int, keep_every: int, best: str | None) -> None:
    """Keep the newest `keep_last` checkpoints, every `keep_every`-th step's as a milestone, and the best."""
    for old in saved_tags(root)[:-keep_last]:
        if old != best and not (keep_every and int(old.removeprefix("step_")) % keep_every == 0):
            shutil.rmtree(root / old)
            shutil.rmtree(root / (old + UNIVERSAL), ignore_errors=True)


def _rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the folder: all or nothing, and on disk."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
