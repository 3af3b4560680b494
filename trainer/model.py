"""Build any transformers causal language model from the config's `model` section."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.config import ModelSection


def build_model(section: ModelSection, vocab_size: int) -> PreTrainedModel:
    """A freshly initialised model; its vocabulary is the prepared data's tokenizer's."""
    hf_config = AutoConfig.for_model(section.type, **section.config, vocab_size=vocab_size)
    return AutoModelForCausalLM.from_config(hf_config)


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on packed samples of seq_len + 1 tokens."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
