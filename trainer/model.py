"""Build any transformers causal language model from the config's `model` section, and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from trainer.config import ConfigError, ModelSection


def model_config(section: ModelSection, vocab_size: int) -> PretrainedConfig:
    """The architecture: from `init_from`'s folder, or `type` + `config`, with the data's vocabulary."""
    if section.init_from is None:
        try:
            return AutoConfig.for_model(section.type, **section.config, vocab_size=vocab_size)
        except (ValueError, StrictDataclassError) as e:  # transformers' own checks, e.g. heads vs hidden size
            cause = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
            raise ConfigError(f"model.config: {cause}") from None
    config = AutoConfig.from_pretrained(section.init_from)
    if config.vocab_size != vocab_size:
        raise ConfigError(f"model.init_from: the model's vocabulary ({config.vocab_size}) is not the data's "
                          f"tokenizer's ({vocab_size}); prepare the data with tokenizer.path: {section.init_from}")
    return config


def build_model(section: ModelSection, vocab_size: int) -> PreTrainedModel:
    """The model to train: the weights of `init_from`, or a fresh initialisation."""
    config = model_config(section, vocab_size)
    if section.init_from is not None:
        # fp32 like a fresh model: DeepSpeed makes its own bf16/fp16 copy and keeps fp32 master weights
        model = AutoModelForCausalLM.from_pretrained(section.init_from, config=config).float()
    else:
        model = AutoModelForCausalLM.from_config(config)
    if section.gradient_checkpointing:
        # Non-reentrant: the variant that works with ZeRO-3's parameter gathering and needs no input grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on packed samples of seq_len + 1 tokens."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
