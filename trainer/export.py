"""Consolidate a sharded ZeRO checkpoint into a Hugging Face `save_pretrained` folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from accelerate import init_empty_weights
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_pipeline import load_tokenizer
from trainer import checkpoint, universal
from trainer.config import ConfigError, load_config
from trainer.data import open_data
from trainer.model import AUTO_MODELS


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
    state_dict = _fp32_weights(ckpt, cfg)
    auto = AUTO_MODELS[cfg.model.task]
    with init_empty_weights():  # no throw-away initialisation of a large model
        model = auto.from_config(data.model_config(cfg.model))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    if model.can_generate():
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, auto.__name__, found.damaged


def _fp32_weights(ckpt: Path, cfg) -> dict:
    """The whole fp32 master weights. DeepSpeed's consolidation joins the partitions of its ZeRO optimizer; the
    tensor slices of a tensor-parallel run, and the partitions of its BF16_Optimizer (ZeRO 1 summing bf16
    gradients in fp32: bf16_zero_* files), come from the universal conversion instead: one a resume made beside
    the checkpoint, or one made here (in a temporary folder beside it: it takes about the checkpoint's size)."""
    if cfg.parallel.tensor == 1 and not any(ckpt.glob("bf16_zero_pp_rank_*")):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if cfg.zero.stage == 0:
        raise ConfigError(f"{ckpt}: a ZeRO-0 checkpoint of a tensor-parallel run keeps its weights sliced in its "
                          "model files, which DeepSpeed's universal conversion does not read; save at zero.stage "
                          "1 or 2 to export")
    made = checkpoint.universal_dir(ckpt.parent, ckpt.name)
    if made.is_dir():
        return universal.weights(made)
    with tempfile.TemporaryDirectory(prefix=f"{ckpt.name}.export-", dir=ckpt.parent) as tmp:
        universal.convert_here(ckpt, Path(tmp) / "universal")
        return universal.weights(Path(tmp) / "universal")
