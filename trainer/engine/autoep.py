"""Expert parallelism of a mixture of experts (parallel.expert) through DeepSpeed's AutoEP: which model types it
knows, its config section, and the names and layout it gives the experts' weights - which exports turn back
into transformers' own."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from trainer.config import ConfigError
from trainer.engine import DEEPSPEED
from trainer.model.moe import routing


def autoep_preset(model_type: str) -> str | None:
    """DeepSpeed AutoEP's preset for a transformers model type (None: AutoEP does not know it)."""
    from deepspeed.module_inject.auto_ep_presets.registry import preset_name_for_hf_model_type

    return preset_name_for_hf_model_type(model_type)


def check_expert_split(config: PretrainedConfig, size: int) -> None:
    """Pre-flight of parallel.expert: a mixture of experts AutoEP knows, whose experts split `size` ways."""
    if size == 1:
        return
    moe = routing(config)
    if moe is None:
        raise ConfigError(f"parallel.expert: model type {config.model_type} is dense (no experts to split); set "
                          "parallel.expert: 1")
    if autoep_preset(config.model_type) is None:
        from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

        known = sorted({t for preset in PRESET_MODELS.values() for t in preset.hf_model_types})
        raise ConfigError(f"parallel.expert: DeepSpeed {DEEPSPEED}'s AutoEP has no preset for model type "
                          f"{config.model_type} (it knows {', '.join(known)}); set parallel.expert: 1")
    if moe.experts % size:
        raise ConfigError(f"parallel.expert: {size} does not divide the model's {moe.experts} experts per layer")


def expert_parallel_config(model_type: str, size: int) -> dict:
    """DeepSpeed's `expert_parallel` section: AutoEP replaces each MoE block by one holding experts / `size` of
    its experts, tokens exchanged all-to-all within groups of `size` consecutive ranks."""
    return {"enabled": True, "autoep_size": size, "preset_model": autoep_preset(model_type)}


# transformers' names of a MoE block's parameters, and AutoEP's for them (its experts split into the gate and up
# projections w1 and w3, and w2)
FUSED, DOWN, ROUTER = "experts.gate_up_proj", "experts.down_proj", "gate.weight"
AUTOEP = {"w1": "experts.w1", "w3": "experts.w3", "w2": "experts.w2", "router": "router.gate.weight"}


def autoep_shapes(shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The names and whole shapes AutoEP gives the parameters of a model whose transformers names and shapes are
    `shapes` (its experts held by one rank or many)."""
    out = dict(shapes)
    for block in _blocks(shapes):
        (experts, rows, cols), down = out.pop(block + FUSED), out.pop(block + DOWN)
        transposed = _transposed(shapes, block)
        half = torch.Size((experts, cols // 2, rows) if transposed else (experts, rows // 2, cols))
        w2 = torch.Size((experts, down[2], down[1])) if transposed else down
        out |= {block + AUTOEP["w1"]: half, block + AUTOEP["w3"]: half, block + AUTOEP["w2"]: w2,
                block + AUTOEP["router"]: out.pop(block + ROUTER)}
    return out


def from_autoep(weights: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """An expert-parallel run's whole weights (AutoEP's names) under transformers' names of `shapes`: the gate and
    up projections joined as transformers stores them, gate first (DeepSpeed's ep_repack splits them so)."""
    out = dict(weights)
    for block in _blocks(shapes):
        w1, w3, w2 = (out.pop(block + AUTOEP[key]) for key in ("w1", "w3", "w2"))
        fused = torch.cat([w1, w3], dim=1)
        if _transposed(shapes, block):
            fused, w2 = fused.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        out[block + FUSED], out[block + DOWN] = fused, w2
        out[block + ROUTER] = out.pop(block + AUTOEP["router"])
    return out


def _transposed(shapes: dict[str, torch.Size], block: str) -> bool:
    """Whether a block stores its experts (experts, in, out) - (experts, hidden, 2 x ffn) - rather than
    (experts, 2 x ffn, hidden), the layout AutoEP's w1/w3 have."""
    return shapes[block + FUSED][1] != 2 * shapes[block + DOWN][2]


def _blocks(shapes: dict[str, torch.Size]) -> list[str]:
    """The name prefixes of the MoE blocks with fused experts (e.g. `model.layers.0.mlp.`)."""
    return [name.removesuffix(FUSED) for name in shapes if name.endswith("." + FUSED)]
