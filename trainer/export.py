"""Consolidate a sharded ZeRO checkpoint into a Hugging Face `save_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

from accelerate import init_empty_weights
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoModelForCausalLM

from data_pipeline import load_tokenizer
from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.data import corpus
from trainer.model import model_config


def export(run_dir: Path, out_dir: Path, tag: str | None = None) -> Path:
    """Writes safetensors weights (fp32 master copy), config, generation config and tokenizer."""
    tag = tag or checkpoint.latest_tag(run_dir)
    ckpt = checkpoint.checkpoints_dir(run_dir) / (tag or "")
    if tag is None or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no complete checkpoint{' ' + tag if tag else ''} to export")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not empty; choose another export folder")
    cfg = load_config(ckpt / "config.yaml")  # the config the checkpoint was trained with
    data = corpus(cfg)
    tokenizer = load_tokenizer(data.tokenizer_dir)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=tag)
    with init_empty_weights():  # no throw-away initialisation of a large model
        model = AutoModelForCausalLM.from_config(model_config(cfg.model, data.vocab_size))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
