"""Convert a ZeRO checkpoint to DeepSpeed's universal (world-size free) format with every rank doing its share.

DeepSpeed's `ds_to_universal` works in two phases: it extracts each optimizer file's parameter fragments (one
work item per saved rank), then merges each parameter's fragments into zero/<param>/{fp32,exp_avg,...}.pt (one
work item per parameter), with a local process pool. Here the ranks of the resuming job split both phases
(saved ranks, then parameters by size) using its own functions, and rank 0 does the short serial end (the
parameters without optimizer state, the common optimizer state, the model files). The result is what the
command writes (tested: the same tensors). Tensor-parallel (AutoTP) checkpoints at ZeRO 1-2 convert like any
other: DeepSpeed joins each parameter's tensor slices along the layout the checkpoint records. Expert-parallel
(AutoEP) ones go through DeepSpeed's own serial conversion instead (`convert_here`, which gathers the experts;
trainer/checkpointing/resume.py chooses), pipeline-parallel ones are not zerotrain's.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.checkpoint import PARAM, UNIVERSAL_CHECKPOINT_INFO, DeepSpeedCheckpoint
from deepspeed.checkpoint import ds_to_universal as ds

from data_pipeline.files import fsync_tree, share


def convert(folder: Path, out: Path, group, log, workers: int = 1) -> None:
    """Collective over `group`: `folder`'s universal conversion into `out` (which must not exist yet). Each rank
    works its share with `workers` processes (DeepSpeed's own pool: the cores this rank may use)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    args = _arguments(folder, out, workers)
    optim_files = ds._get_optim_files(str(folder))
    stage3_files = ds._filter_zero3_optim_files(optim_files)
    stage = ds._get_zero_stage(stage3_files or optim_files)
    log(f"converting {folder.name} (ZeRO {int(stage)}, {len(optim_files)} optimizer file(s)) to a universal checkpoint: "
        f"extracting, then merging, each rank a share of {world}")
    if stage <= 2:
        _stage_1_2(args, rank, world, group)
    else:
        _stage_3(args, stage3_files, rank, world, group)
    if rank == 0:
        shutil.rmtree(out / "tmp", ignore_errors=True)
        fsync_tree(out)
    dist.barrier(group)


def convert_here(folder: Path, out: Path) -> None:
    """`folder`'s universal conversion by this process alone (DeepSpeed's own command; its report to stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        ds.main(_arguments(folder, out, workers=1))


def weights(folder: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The whole fp32 parameters of a universal checkpoint, by name, in the model's `shapes`. A ZeRO-3 conversion
    stores each parameter as its partitions joined (flat, padded to a multiple of the ranks), not in a dict."""
    loaded = {name: torch.load(folder / "zero" / name / "fp32.pt", map_location="cpu", weights_only=True)
              for name in shapes}
    return {name: (t[PARAM] if isinstance(t, dict) else t.flatten()[:shapes[name].numel()]).view(shapes[name])
            for name, t in loaded.items()}


def _arguments(folder: Path, out: Path, workers: int) -> argparse.Namespace:
    return argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)


def _stage_1_2(args, rank: int, world: int, group) -> None:
    box = [None]
    if rank == 0:  # it reads the model files once; the others get its (metadata) view of them
        checkpoint = DeepSpeedCheckpoint(args.input_folder)
        ds._inject_missing_state(checkpoint)
        ds._check_for_required_state(checkpoint)
        box = [checkpoint]
    dist.broadcast_object_list(box, src=0, group=group)
    checkpoint = box[0]
    shapes_by_tp, autoep, _ = ds._aggregate_autoep_zero12_metadata(checkpoint.model_state_metadata)
    if autoep is not None or checkpoint.pp_degree != 1:
        raise NotImplementedError("universal conversion of expert- or pipeline-parallel checkpoints")
    slice_shapes = ds._group_per_tp_shapes(shapes_by_tp, checkpoint.pp_degree, checkpoint.tp_degree)
    temp, zero = os.path.join(args.output_folder, "tmp"), os.path.join(args.output_folder, "zero")
    saved = list(itertools.product(range(checkpoint.pp_degree), range(checkpoint.tp_degree),
                                   range(checkpoint.dp_degree)))
    ds._do_parallel_work(partial(ds.extract_zero_shards, temp, checkpoint), share(saved, rank, world),
                         args.num_extract_workers)
    dist.barrier(group)
    merge = partial(ds.merge_tp_slices, checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO), zero, temp,
                    checkpoint.tp_degree)
    mine = share(sorted(slice_shapes.items()), rank, world, size=lambda item: _numel(item[1][0]))
    unmatched = ds._do_parallel_work(merge, mine, args.num_merge_workers)
    everyone = [None] * world
    dist.all_gather_object(everyone, [set(u) for u in unmatched], group=group)
    sets = [s for part in everyone for s in part]
    if sets and set.intersection(*sets):
        raise RuntimeError(f"universal conversion: unused patterns {sorted(set.intersection(*sets))}")
    dist.barrier(group)
    if rank == 0:
        for model_file in checkpoint.mp_rank_files:  # parameters ZeRO keeps no optimizer state for
            state = torch.load(model_file, map_location="cpu", weights_only=False).get("module") or {}
            for name, tensor in state.items():
                path = os.path.join(zero, name, "fp32.pt")
                if not os.path.isfile(path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    torch.save({PARAM: tensor.float()}, path)
        ds._save_optimizer_state(args, checkpoint)
        for model_file in checkpoint.mp_rank_files:
            shutil.copy2(model_file, args.output_folder)


def _stage_3(args, optim_files: list[str], rank: int, world: int, group) -> None:
    model_files = ds._get_zero3_model_state_files(args.input_folder)
    model_grid, tp, dp = ds._build_zero3_rank_grid(model_files)
    optim_grid, tp_optim, dp_optim = ds._build_zero3_rank_grid(optim_files)
    if tp != 1 or (tp, dp) != (tp_optim, dp_optim):
        raise NotImplementedError("universal conversion of tensor-parallel ZeRO-3 checkpoints")
    shapes_grid = [ds._parse_model_states_stage3([model_grid[0][0]])]
    temp, zero = os.path.join(args.output_folder, "tmp"), os.path.join(args.output_folder, "zero")
    ds._do_parallel_work(partial(ds.extract_zero_shards_stage3, optim_grid, shapes_grid, dp, temp),
                         share([(0, j) for j in range(dp)], rank, world), args.num_extract_workers)
    dist.barrier(group)
    shapes = {name: shape for group_shapes in shapes_grid[0] for name, shape in group_shapes.items()}
    ds._do_parallel_work(partial(ds.merge_zero3_slices, dp, zero, temp),
                         share(sorted(shapes), rank, world, size=lambda name: _numel(shapes[name])),
                         args.num_merge_workers)
    dist.barrier(group)
    if rank == 0:
        ds._save_optimizer_state_stage3(args, optim_files)
        for model_file in glob.glob(os.path.join(args.input_folder, "*model_states.pt")):
            shutil.copy2(model_file, args.output_folder)


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n
