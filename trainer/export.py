"""Consolidate a sharded ZeRO checkpoint into a Hugging Face `save_pretrained` folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_pipeline import load_tokenizer
from trainer import checkpoint, universal
from trainer.config import ConfigError, load_config
from trainer.data import open_data
from trainer.model import AUTO_MODELS
from trainer.optim import param_groups


def choose(run_dir: Path, tag: str | None) -> checkpoint.Found:
    """The checkpoint to export, verified like a resume verifies it: `latest` (the default) is the newest intact
    one; `best` or a step's tag must be intact itself."""
    if not checkpoint.checkpoints_dir(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: not a run directory with checkpoints")
    if tag == "best":
        tag = checkpoint.pointer(run_dir, checkpoint.BEST)
        if tag is None:
            raise ConfigError(f"{run_dir}: no best checkpoint (set eval.best_metric to keep one)")
    elif tag not in (None, "latest") and not checkpoint.TAG.fullmatch(tag):
        raise ConfigError(f"--tag: {tag!r} is not a checkpoint (step_00000100, best or latest)")
    found = checkpoint.find(run_dir, checksums=True, tag=None if tag in (None, "latest") else tag)
    if found.tag is None:
        raise ConfigError(f"{run_dir}: no intact checkpoint to export" +
                          (f" ({found.damaged[0]})" if found.damaged else ""))
    return found


def export(run_dir: Path, out_dir: Path, tag: str | None = None) -> tuple[Path, str, list[str]]:
    """Writes safetensors weights (fp32 master copy), config (with the label names of a classifier),
    generation config and tokenizer. `tag`: a step's, "best" or "latest" (the default). Returns the folder,
    the transformers Auto class that loads it, and the damaged checkpoints passed over."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: exists and is not an empty folder; choose another export folder")
    found = choose(run_dir, tag)
    ckpt = checkpoint.checkpoints_dir(run_dir) / found.tag
    cfg = load_config(ckpt / "config.yaml")  # the config the checkpoint was trained with
    if cfg.zero.offload_optimizer == "nvme":
        raise ConfigError(f"{ckpt}: its fp32 weights are in NVMe swap files (zero.offload_optimizer: nvme), which "
                          "DeepSpeed's consolidation cannot read; export a checkpoint of a run without NVMe "
                          "optimizer offload")
    data = open_data(cfg)
    tokenizer = load_tokenizer(data.tokenizer_dir, require_eos=False)
    auto = AUTO_MODELS[cfg.model.task]
    with init_empty_weights():  # no throw-away initialisation of a large model
        model = auto.from_config(data.model_config(cfg.model))
    model.tie_weights()  # as the trained model was: a tied output layer is not a parameter of its own
    # Not strict: the tied output layer's name is not among the weights (tie_weights points it again).
    _, unexpected = model.load_state_dict(_fp32_weights(ckpt, cfg, model), strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, t in model.state_dict().items() if t.is_meta]
    if unexpected or missing:
        raise ConfigError(f"{ckpt}: its weights do not fit the model of its config.yaml (missing: "
                          f"{missing[:3]}, unexpected: {unexpected[:3]})")
    if model.can_generate():
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, auto.__name__, found.damaged


def _fp32_weights(ckpt: Path, cfg, model: torch.nn.Module) -> dict:
    """The whole fp32 master weights of `model`'s parameters. ZeRO 0 keeps them in its one model file; DeepSpeed's
    consolidation joins the partitions of its ZeRO optimizer at stages 1-3; the tensor slices of a
    tensor-parallel run, and the partitions of ZeRO 1's BF16_Optimizer (bf16 gradients summed in fp32:
    bf16_zero_* files), come from the universal conversion instead: one a resume made beside the checkpoint, or
    one made here (in a temporary folder beside it: it takes about the checkpoint's size)."""
    if cfg.zero.stage == 0 and cfg.parallel.tensor == 1:
        return _zero_0_weights(ckpt / "mp_rank_00_model_states.pt", cfg, model)
    if cfg.parallel.tensor == 1 and not (cfg.zero.stage == 1 and any(ckpt.glob("bf16_zero_pp_rank_*"))):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if cfg.zero.stage == 0:
        raise ConfigError(f"{ckpt}: a ZeRO-0 checkpoint of a tensor-parallel run keeps its weights sliced in its "
                          "model files, which DeepSpeed's universal conversion does not read; save at zero.stage "
                          "1 or 2 to export")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    made = checkpoint.universal_dir(ckpt.parent, ckpt.name)
    if made.is_dir():
        return universal.weights(made, shapes)
    with tempfile.TemporaryDirectory(prefix=f"{ckpt.name}.export-", dir=ckpt.parent) as tmp:
        universal.convert_here(ckpt, Path(tmp) / "universal")
        return universal.weights(Path(tmp) / "universal", shapes)


def _zero_0_weights(model_file: Path, cfg, model: torch.nn.Module) -> dict:
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
