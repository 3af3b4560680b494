"""Optimizer parameter groups and the learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, named: bool = False) -> list[dict]:
    """Decay matrices only: norms and biases (1-D tensors) are not weight-decayed, as in GPT-2/Llama recipes.
    A parameter built partitioned (deepspeed.zero.Init) is an empty stand-in: its real shape is `ds_shape`.
    `named`: the groups carry names, by which DeepSpeed splits each into its expert and other parameters under
    expert parallelism (only then: named groups cost fp32 training at ZeRO 0 a quarter more memory, measured)."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = {id(p): len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params}
    groups = [
        {"params": [p for p in params if matrix[id(p)]], "weight_decay": weight_decay},
        {"params": [p for p in params if not matrix[id(p)]], "weight_decay": 0.0},
    ]
    if named:
        for group, name in zip(groups, ("decay", "no_decay"), strict=True):
            group["name"] = name
    return groups


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """Multiplier of the peak lr after `step` optimizer steps: the first step already learns."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
