"""Will the run fit the machine it starts on? Before any rank starts: the memory of this node's ranks, from the
memory model (host RAM for CPU ranks; the GPU's memory for GPU ranks, and host RAM for what they offload),
and the disk space its checkpoints will take."""

from __future__ import annotations

import shutil

import psutil
import torch
from transformers import PretrainedConfig

from trainer.config import Config, ConfigError
from trainer.memory import OPTIONS, GiB, Option, activation_bytes, element_bytes, estimate
from trainer.model.shape import Architecture, architecture
from trainer.parallel.distributed import uses_gpus

# Measured on CPU: what a rank holds before its model exists (interpreter, torch, DeepSpeed, transformers, the
# process group), and what a DataLoader worker adds (forked before the model: the rank's later pages are not
# its own).
RANK_BASE = 0.6 * GiB
WORKER_BASE = 0.25 * GiB
HEADROOM = 0.95  # of a machine's memory a run may plan to use


def check(cfg: Config, auto, model: PretrainedConfig, on_training_machine: bool) -> list[str]:
    """Notes for the user; raises ConfigError when the ranks cannot fit in this machine's memory. `auto`, `model`:
    the task's transformers Auto class and the model's config."""
    arch = architecture(auto, model, cfg.model)
    notes = _disk(cfg, arch)
    if on_training_machine:
        notes += _memory(cfg, arch)
    return notes


def checkpoint_bytes(arch: Architecture, precision: str) -> int:
    """A checkpoint's size: the 16-bit (or fp32) weights, the fp32 master copy and both Adam moments of the
    trained parameters (a LoRA run's adapters: its frozen base is not saved)."""
    return (element_bytes(precision) + 12) * arch.trainable


def _disk(cfg: Config, arch: Architecture) -> list[str]:
    size, keep = checkpoint_bytes(arch, cfg.train.precision), cfg.checkpoint.keep_last + 1
    folder = next(p for p in (cfg.run_dir, *cfg.run_dir.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free >= keep * size:
        return []
    return [f"checkpoint.keep_last: {keep} checkpoints of {size / GiB:.2f} GiB (keep_last + 1 while a save is "
            f"written) need {keep * size / GiB:.2f} GiB, and the disk holding {folder} has {free / GiB:.2f} GiB "
            "free: a save will fail when it fills up (the previous checkpoint stays intact)"]


def _memory(cfg: Config, arch: Architecture) -> list[str]:
    ranks, t = cfg.launch.nproc_per_node, cfg.train
    host = psutil.virtual_memory()
    e = element_bytes(t.precision)
    activations = activation_bytes(arch, t.precision, t.micro_batch_size, cfg.data.seq_len,
                                   cfg.model.gradient_checkpointing)
    bound = (2 * e + 16) * arch.params + activations  # every stage's model states and buffers stay below this
    per_rank_base = RANK_BASE + cfg.data.num_workers * WORKER_BASE
    gpus = uses_gpus()
    if not gpus and ranks * (bound + per_rank_base) < 0.5 * host.total:
        return []  # far from the limit: not worth DeepSpeed's import for the exact figure
    option = Option(cfg.zero.stage, cfg.zero.offload_optimizer != "none", cfg.zero.offload_param != "none")
    est = estimate(cfg, arch, option, cfg.launch.nnodes, ranks)
    on_device = est.peak(cfg.model.gradient_checkpointing)
    if gpus:
        gpu = torch.cuda.get_device_properties(0).total_memory
        if on_device > HEADROOM * gpu:
            raise ConfigError(f"zero.stage: {option} needs about {on_device / GiB:.1f} GiB per GPU (zerotrain plan's "
                              f"estimate), more than the {gpu / GiB:.1f} GiB of this node's GPUs; "
                              f"{_what_fits(cfg, arch, HEADROOM * gpu, gpu=True)}")
        on_device = 0  # the GPU holds it; the host holds what is offloaded
    saving = est.save_copy if cfg.async_saves else 0  # a save's host copy while it is written
    need = ranks * (on_device + est.host + saving + per_rank_base)
    where = f"{ranks} rank(s) x {(need / ranks) / GiB:.1f} GiB"
    if need > HEADROOM * host.total:
        usable = HEADROOM * host.total / ranks - per_rank_base - est.host - saving
        raise ConfigError(f"zero.stage: {option} needs about {need / GiB:.1f} GiB of this machine's memory ({where}, "
                          f"zerotrain plan's estimate), more than its {host.total / GiB:.1f} GiB; "
                          f"{_what_fits(cfg, arch, usable, gpu=False)}")
    if need > host.available:
        return [f"memory: the ranks need about {need / GiB:.1f} GiB ({where}) and {host.available / GiB:.1f} GiB "
                "are free now: other processes must give memory back, or the kernel's OOM killer ends a rank"]
    return []


def _what_fits(cfg: Config, arch: Architecture, usable: float, gpu: bool) -> str:
    """What would fit in `usable` bytes per rank: a higher stage, offload (on GPUs), activation checkpointing."""
    nodes, ranks = cfg.launch.nnodes, cfg.launch.nproc_per_node
    for checkpointing in (cfg.model.gradient_checkpointing, True):
        for option in OPTIONS:
            if (option.offload_optimizer and not gpu) or option.stage < cfg.zero.stage:
                continue  # on CPU ranks offloading moves memory within the same RAM
            est = estimate(cfg, arch, option, nodes, ranks)
            if est.peak(checkpointing) + (0 if gpu else est.host) <= usable:
                zero = option.zero_section()
                extra = " with model.gradient_checkpointing: true" if checkpointing and not \
                    cfg.model.gradient_checkpointing else ""
                return (f"{option} would fit (zero.stage: {zero.stage}, zero.offload_optimizer: {zero.offload_optimizer}, "
                        f"zero.offload_param: {zero.offload_param}){extra}, or fewer ranks per node")
    return ("no ZeRO stage fits even with activation checkpointing: lower train.micro_batch_size or data.seq_len, "
            "or use more nodes")
