"""Sample text from an exported model with plain transformers: what a user of the export would do."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    outputs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=True, temperature=temperature, top_k=50,
                                 max_new_tokens=max_new_tokens)
        outputs.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return outputs
