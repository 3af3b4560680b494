"""Build any transformers causal language model from the config's `model` section."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.config import ModelSection


def build_model(section: ModelSection, vocab_size: int) -> PreTrainedModel:
    """A freshly initialised model; its vocabulary is the prepared data's tokenizer's."""
    hf_config = AutoConfig.for_model(section.type, **section.config, vocab_size=vocab_size)
    return AutoModelForCausalLM.from_config(hf_config)


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())
