"""Building the model a run trains: its transformers config and the model itself (fresh or from init_from)."""

from __future__ import annotations

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from trainer.config import ConfigError, ModelSection
from trainer.model import lora
from trainer.parallel.distributed import uses_gpus


def model_config(section: ModelSection, vocab_size: int) -> PretrainedConfig:
    """The architecture: from `init_from`'s folder, or `type` + `config`, with the data's vocabulary (the task adds
    what it needs, trainer/tasks)."""
    if section.init_from is None:
        try:
            config = AutoConfig.for_model(section.type, **section.config, vocab_size=vocab_size)
        except (ValueError, StrictDataclassError) as e:  # transformers' own checks, e.g. heads vs hidden size
            cause = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
            raise ConfigError(f"model.config: {cause}") from None
    else:
        try:
            config = AutoConfig.from_pretrained(section.init_from)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init_from: {section.init_from}: {str(e).splitlines()[0]}") from None
        if config.vocab_size != vocab_size:
            raise ConfigError(f"model.init_from: the model's vocabulary ({config.vocab_size}) is not the data's "
                              f"tokenizer's ({vocab_size}); prepare the data with tokenizer.path: {section.init_from}")
    if section.attention is not None:
        config._attn_implementation = section.attention
    return config


def build_model(section: ModelSection, config: PretrainedConfig, auto, fresh_head: bool = False,
                quantized: bool = True) -> PreTrainedModel:
    """The model to train, of the task's transformers Auto class `auto`: the weights of `init_from`, or a fresh
    initialisation. `fresh_head`: a head whose size differs from init_from's is replaced (a classifier of other
    labels). Under a live `HfDeepSpeedConfig` of stage 3, transformers builds it partitioned. `quantized`: the
    linear layers in 4 bits where model.lora.quantize says so (an export merges into the full-precision base)."""
    quantization = lora.quantization(section.lora) if quantized else None
    if quantization is not None:  # bitsandbytes quantizes the weights as they load onto this rank's device
        device = torch.device("cuda", torch.cuda.current_device()) if uses_gpus() else torch.device("cpu")
        model = auto.from_pretrained(section.init_from, config=config, dtype=torch.bfloat16,
                                     quantization_config=quantization, device_map={"": device},
                                     ignore_mismatched_sizes=fresh_head)
    elif section.init_from is not None:
        # fp32 like a fresh model: DeepSpeed makes its own bf16/fp16 copy and keeps fp32 master weights.
        model = auto.from_pretrained(section.init_from, config=config, dtype=torch.float32,
                                     ignore_mismatched_sizes=fresh_head)
    else:
        model = auto.from_config(config)
    model.train()  # from_pretrained returns it in evaluation mode: no dropout until the first validation
    if section.gradient_checkpointing:
        # Non-reentrant: the variant that works with ZeRO-3's parameter gathering and needs no input grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
