"""Sample text from an exported model with plain transformers: what a user of the export would do."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.errors import UserError


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    positions = getattr(model.config, "max_position_embeddings", None)
    outputs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        if positions is not None and length + max_new_tokens > positions:
            raise UserError(f"--max-new-tokens: {max_new_tokens} after a prompt of {length} tokens exceeds the "
                            f"model's {positions} positions; at most {max(0, positions - length)} here")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=True, temperature=temperature, top_k=50,
                                 max_new_tokens=max_new_tokens)
        outputs.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return outputs
