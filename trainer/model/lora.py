"""Low-rank adapters (model.lora) through PEFT: the frozen base model wrapped with LoRA layers, checked before any
rank starts, and the fingerprint that ties a LoRA run's checkpoints to the base model they adapt.

A LoRA run trains the adapters (and `modules_to_save`, e.g. a classifier's head) only: every other parameter is
frozen, so the optimizer holds states for the trainable ones alone (trainer/optim.py takes those that require
gradients) and a checkpoint stores them without the base (DeepSpeed's exclude_frozen_parameters). On resume and at
export the base comes again from model.init_from - hence the fingerprint - or, without one, from the seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from pathlib import Path

import torch

# PEFT imports bitsandbytes where installed, whose CPU backend then looks for an optional kernel from the Hub and
# warns at every start when the `kernels` package is absent; its fallback is what QLoRA on CPU was measured with.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from trainer.config import Config, ConfigError, LoraSection, ModelSection
from trainer.engine import DEEPSPEED

# PEFT's task types: what the wrapper's forward takes, and which heads it trains fully (a classifier's)
PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sft": "CAUSAL_LM", "classification": "SEQ_CLS"}
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: marks an exported adapter's folder
TASK_CONFIG = "task_config.json"  # beside an adapter: the trained model's transformers config (a classifier's labels)


def lora_config(section: LoraSection, task: str) -> LoraConfig:
    """PEFT's config of the adapters of model.lora `section` for model.task `task`."""
    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.target_modules, modules_to_save=section.modules_to_save or None,
                      task_type=PEFT_TASKS[task])


def check_lora(cfg: Config, cuda_available: bool | None) -> None:
    """One-line ConfigErrors for what the adapters cannot be combined with (no files read).
    `cuda_available=None`: the device is not known yet."""
    if cfg.model.lora.quantize is None:
        return
    if cuda_available is False:  # measured with bitsandbytes 0.50.2 (the note in docs/lora.md)
        raise ConfigError("model.lora.quantize: 4-bit bases need a CUDA GPU: bitsandbytes' CPU kernels train but "
                          "do not resume exactly (a resumed run's first loss differs by 4e-3); use LoRA on the "
                          "bf16 base here")
    if cfg.model.init_from is None:
        raise ConfigError("model.lora.quantize: quantizes a trained base model; give model.init_from")
    if cfg.train.precision != "bf16":
        raise ConfigError(f"model.lora.quantize: the 4-bit base computes in bf16; set train.precision: bf16 (got "
                          f"{cfg.train.precision})")
    if cfg.zero.stage == 3:  # measured on 2 gloo ranks: losses that rise, then an AssertionError in the save
        raise ConfigError(f"model.lora.quantize: DeepSpeed {DEEPSPEED}'s ZeRO 3 partitions the packed 4-bit weights "
                          "and breaks them; use zero.stage 0-2 (a 4-bit base is a quarter of a 16-bit one)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.quantize: needs the bitsandbytes package (pip install bitsandbytes), not "
                          "installed here")


def quantization(section: LoraSection | None):
    """transformers' quantization config of the base (None: not quantized). NF4 with bf16 compute; the packed
    weights stored as bf16 elements, the dtype DeepSpeed's bf16 engine keeps the module in."""
    if section is None or section.quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_quant_storage=torch.bfloat16)


def add_adapters(model: torch.nn.Module, section: LoraSection, task: str, seed: int) -> PeftModel:
    """`model` with LoRA layers on its target modules, all else frozen. The adapters' initial values come from
    `seed` (lora_A random, lora_B zero): the same on every rank and at every ZeRO stage."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # PEFT warns about every Conv1D it transposes (GPT-2): nothing to act on
        warnings.simplefilter("ignore", UserWarning)
        try:
            return get_peft_model(model, lora_config(section, task))
        except ValueError as e:  # PEFT's own checks: targets that match nothing, modules it cannot wrap
            cause = " ".join(str(e).split()).removeprefix("[PEFT:PeftType.LORA] ")
            if "not found in the base model" in cause:
                raise ConfigError(f"model.lora.target_modules: {section.target_modules} match no layer of the "
                                  f"model; its linear layers: {', '.join(linear_names(model))}") from None
            raise ConfigError(f"model.lora: PEFT cannot add adapters to this {model.config.model_type} model "
                              f"({cause})") from None


def linear_names(model: torch.nn.Module) -> list[str]:
    """The last part of the name of every linear layer (nn.Linear, and transformers' Conv1D of GPT-2)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})


def check_adapters(model: PeftModel, section: LoraSection) -> None:
    """Pre-flight, on the wrapped model built on the meta device: the rank fits every adapted layer."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            smaller = min(module.in_features, module.out_features)
            if section.rank > smaller:
                raise ConfigError(f"model.lora.rank: {section.rank} exceeds the smaller side of layer "
                                  f"{name.removeprefix('base_model.model.')} ({module.in_features} -> "
                                  f"{module.out_features}); at most {smaller}, or leave that layer out of "
                                  "model.lora.target_modules")


# The fingerprint reads each weight file's size, its first MiB (a safetensors file's header: every tensor's name,
# dtype and shape) and SAMPLES windows spread over the rest: another model, or other weights of the same shape,
# changes it; reading a 140 GB base whole at every resume would not be worth the minutes.
SAMPLES, WINDOW = 64, 2**16


def base_of(section: ModelSection) -> str:
    """What identifies the frozen base of a LoRA run: the fingerprint of model.init_from's weights (a Hub name's
    own name), "" without adapters or without init_from (then the seed and the model's config, which may not
    change on resume, make the base)."""
    if section.lora is None or section.init_from is None:
        return ""
    return fingerprint(section.init_from) if section.init_from.is_dir() else str(section.init_from)


def fingerprint(folder: Path) -> str:
    """A fingerprint of the model weight files in `folder`."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name} {size}\n".encode())
        with open(path, "rb") as f:
            digest.update(f.read(2**20))
            for i in range(SAMPLES):
                f.seek(size * i // SAMPLES)
                digest.update(f.read(WINDOW))
    return digest.hexdigest()[:16]
