"""Sample text from an exported model with plain transformers: what a user of the export would do."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils.logging import disable_progress_bar

from data_pipeline.errors import UserError
from launcher.models import export_config, load_export


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    config = export_config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [tokenizer(prompt, return_tensors="pt") for prompt in prompts]
    check_length(config, [e["input_ids"].shape[1] for e in encoded], max_new_tokens)
    disable_progress_bar()  # the samples are the output; a loading bar on stderr is not
    model = load_export(model_dir, AutoModelForCausalLM)
    torch.manual_seed(seed)
    outputs = []
    for inputs in encoded:
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=True, temperature=temperature, top_k=50,
                                 max_new_tokens=max_new_tokens)
        outputs.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return outputs


def check_length(config, lengths: list[int], max_new_tokens: int) -> None:
    """Before the model loads: every prompt and its continuation fit the model's positions."""
    positions = getattr(config, "max_position_embeddings", None)
    longest = max(lengths)
    if positions is not None and longest + max_new_tokens > positions:
        raise UserError(f"--max-new-tokens: {max_new_tokens} after a prompt of {longest} tokens exceeds the "
                        f"model's {positions} positions; at most {max(0, positions - longest)} here")
