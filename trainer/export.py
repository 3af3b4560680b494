"""Consolidate a sharded ZeRO checkpoint into a Hugging Face `save_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

from accelerate import init_empty_weights
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_pipeline import load_tokenizer
from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.data import corpus
from trainer.model import AUTO_MODELS, model_config


def export(run_dir: Path, out_dir: Path, tag: str | None = None) -> tuple[Path, str]:
    """Writes safetensors weights (fp32 master copy), config (with the label names of a classifier),
    generation config and tokenizer. `tag`: a step's, "best" or "latest" (the default). Returns the folder
    and the transformers Auto class that loads it."""
    pointers = {None: checkpoint.latest_tag, "latest": checkpoint.latest_tag, "best": checkpoint.best_tag}
    if tag in pointers:
        named, tag = tag, pointers[tag](run_dir)
        if tag is None and named == "best":
            raise ConfigError(f"{run_dir}: no best checkpoint (set train.best_metric to keep one)")
    ckpt = checkpoint.checkpoints_dir(run_dir) / (tag or "")
    if tag is None or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no complete checkpoint{' ' + tag if tag else ''} to export")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not empty; choose another export folder")
    cfg = load_config(ckpt / "config.yaml")  # the config the checkpoint was trained with
    if cfg.zero.offload_optimizer == "nvme":
        raise ConfigError(f"{ckpt}: its fp32 weights are in NVMe swap files (zero.offload_optimizer: nvme), which "
                          "DeepSpeed's consolidation cannot read; export a checkpoint of a run without NVMe "
                          "optimizer offload")
    data = corpus(cfg)
    tokenizer = load_tokenizer(data.tokenizer_dir, require_eos=False)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=tag)
    auto = AUTO_MODELS[cfg.model.task]
    config = model_config(cfg.model, data.vocab_size, data.labelled.labels if data.labelled else None,
                          data.pad_token_id)
    with init_empty_weights():  # no throw-away initialisation of a large model
        model = auto.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    if model.can_generate():
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, auto.__name__
