"""Loading an export as its user would: a transformers folder, or a LoRA adapter in PEFT's format on the base
model its adapter_config.json names (what `zerotrain export` writes without --merge)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from data_pipeline.errors import UserError
from trainer.model.lora import ADAPTER_CONFIG, TASK_CONFIG


def is_adapter(model_dir: Path) -> bool:
    return (model_dir / ADAPTER_CONFIG).is_file()


def export_config(model_dir: Path) -> PretrainedConfig:
    """The exported model's transformers config."""
    if is_adapter(model_dir):
        return AutoConfig.from_pretrained(model_dir / TASK_CONFIG)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a Hugging Face model folder (no config.json) nor a LoRA adapter (no "
                        f"{ADAPTER_CONFIG})")
    return AutoConfig.from_pretrained(model_dir)


def load_export(model_dir: Path, auto):
    """The exported model, of transformers Auto class `auto`, in evaluation mode."""
    if not is_adapter(model_dir):
        return auto.from_pretrained(model_dir).eval()
    from peft import PeftModel

    base = json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(f"{model_dir / ADAPTER_CONFIG}: its base model {base} is not there; restore it, or export "
                        "the run with --merge")
    # the adapter carries what the base lacks (a classifier's head of its labels): built fresh, then loaded
    model = auto.from_pretrained(base, config=export_config(model_dir), ignore_mismatched_sizes=True)
    return PeftModel.from_pretrained(model, model_dir).eval()
