"""The whole fp32 master weights of a DeepSpeed checkpoint folder, by parameter name, for export: wherever
DeepSpeed's layout of that stage, precision and tensor degree keeps them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_pipeline.errors import UserError
from trainer.config import Config
from trainer.engine import universal
from trainer.engine.autoep import autoep_shapes, from_autoep
from trainer.optim import param_groups


def fp32_weights(ckpt: Path, cfg: Config, model: torch.nn.Module, made: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 master weights of `model`'s trained parameters (all, or a LoRA run's adapters). ZeRO 0 keeps them in its one model file; DeepSpeed's
    consolidation joins the partitions of its ZeRO optimizer at stages 1-3; the tensor slices of a
    tensor-parallel run, and the partitions of ZeRO 1's BF16_Optimizer (bf16 gradients summed in fp32:
    bf16_zero_* files), come from the universal conversion instead: one a resume made beside the checkpoint, or
    one made here (in a temporary folder beside it: it takes about the checkpoint's size). `made`: where a
    resume's universal conversion of `ckpt` would be."""
    sliced = cfg.parallel.tensor > 1 or cfg.parallel.expert > 1
    if cfg.zero.stage == 0 and not sliced:
        return _zero_0_weights(ckpt / "mp_rank_00_model_states.pt", cfg, model)
    if not sliced and not (cfg.zero.stage == 1 and any(ckpt.glob("bf16_zero_pp_rank_*"))):
        # a LoRA run's checkpoints hold no frozen parameters (DeepSpeed's exclude_frozen_parameters)
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                        exclude_frozen_parameters=True)
    if cfg.zero.stage == 0:
        raise UserError(f"{ckpt}: a ZeRO-0 checkpoint of a tensor- or expert-parallel run keeps its weights sliced "
                          "in its model files, which DeepSpeed's universal conversion does not read; save at "
                          "zero.stage 1-3 to export")
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    if cfg.parallel.expert == 1:
        return _universal_weights(ckpt, made, shapes)
    return from_autoep(_universal_weights(ckpt, made, autoep_shapes(shapes)), shapes)


def _universal_weights(ckpt: Path, made: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The weights of `shapes` from the universal conversion of `ckpt`: a resume's at `made`, or one made now."""
    if made.is_dir():
        return universal.weights(made, shapes)
    with tempfile.TemporaryDirectory(prefix=f"{ckpt.name}.export-", dir=ckpt.parent) as tmp:
        universal.convert_here(ckpt, Path(tmp) / "universal")
        return universal.weights(Path(tmp) / "universal", shapes)


def _zero_0_weights(model_file: Path, cfg: Config, model: torch.nn.Module) -> dict:
    """ZeRO 0 saves the module's own weights, and under bf16/fp16 its optimizer's fp32 copies of them, group by
    group in the order of the optimizer's parameter groups (trainer/optim.py), which `model` gives again."""
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if fp32_groups is None:  # fp32 training: the module is the master copy
        return {name: tensor.float() for name, tensor in saved["module"].items()}
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: tensor.float() for group, tensors in zip(param_groups(model, cfg.optim.weight_decay),
                                                                     fp32_groups, strict=True)
            for p, tensor in zip(group["params"], tensors, strict=True)}
