"""Initial weights that depend on the run's seed and each module's name only.

A model transformers builds whole draws its weights from the global RNG in construction order; built inside
`deepspeed.zero.Init` (ZeRO 3), the same seed gives other weights (the stream is consumed differently), so
switching the stage, partitioned building or the number of ranks changed the experiment. Here every module is
drawn again by the model's own initialisation (`_init_weights`: its std, its zeros and ones, GPT-2's scaled
projections) from a generator seeded by (seed, module name), on the CPU, whatever device the weights live on.

Under zero.Init a module's parameters are gathered for the draw and one rank draws them (the modules are dealt
out over the ranks, so a large model's start-up is shared); leaving the gathered context partitions that
rank's values to every rank. Built whole, every rank draws every module (the same values).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.distributed as dist
from transformers import PreTrainedModel


def initialise(model: PreTrainedModel, seed: int, gather=None) -> None:
    """Draw `model`'s weights again from `seed`. `gather`: for a model built partitioned, the engine's context
    that gathers parameters and partitions a rank's changes to them again (`gather(params, modifier_rank=r)`,
    DeepSpeed's GatheredParameters); None for a model built whole."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if gather else (1, 0)
    # post-order, as transformers applies _init_weights: a parent may redraw its children (GPT-2's c_proj)
    modules = list(model.named_modules())[::-1]
    for index, (name, module) in enumerate(modules):
        owned = _owned(module)
        if not owned:
            continue
        drawer = index % world
        gathered = gather([p for _, _, p in owned], modifier_rank=drawer) if gather else contextlib.nullcontext()
        with gathered:
            if rank == drawer:
                _draw(model, module, owned, _seed(seed, name))


def _owned(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """The parameters `_init_weights(module)` may set: the module's own and its direct children's."""
    seen, owned = set(), []
    for owner in (module, *module.children()):
        for attr, p in owner.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                owned.append((owner, attr, p))
    return owned


def _draw(model: PreTrainedModel, module: torch.nn.Module, owned, seed: int) -> None:
    """`_init_weights(module)` on CPU fp32 twins of its parameters (holding their current values, so what it
    leaves alone stays), then copied into the parameters."""
    twins = [torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True)) for _, _, p in owned]
    for (owner, attr, _), twin in zip(owned, twins):
        owner._parameters[attr] = twin
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model._init_weights(module)
    finally:
        for owner, attr, p in owned:
            owner._parameters[attr] = p
    with torch.no_grad():
        for (_, _, p), twin in zip(owned, twins):
            p.copy_(twin)


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)
