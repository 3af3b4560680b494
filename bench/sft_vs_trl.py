"""zerotrain's supervised fine-tuning against TRL's SFTTrainer (the anchor; TRL is a benchmark-only dependency:
`pip install trl==1.16.0` into the venv).

1. The tokens learned, compared token for token on real data where TRL can make a mask:
   - conversations (ShareGPT, the first --conversations that zerotrain keeps): TRL's `assistant_only_loss` needs
     `{% generation %}` markers, which SmolLM2's ChatML template lacks (TRL ships marked templates for a few other
     families only), so TRL gets the same ChatML template with markers around each reply and its end of turn;
     zerotrain renders SmolLM2's own template (no markers: rendered prefixes).
   - plain prompt/completion pairs (each ShareGPT conversation's first question and reply): TRL's
     `completion_only_loss` against zerotrain's prompt/completion reading.
   Both must give the same input ids and the same learned tokens.
2. Training, with the same model (SmolLM2-135M-Instruct), data (the conversations zerotrain prepared, packed
   best-fit decreasing into --seq-len samples), schedule, and DeepSpeed config (ZeRO 2, bf16), 2 CPU ranks:
   zerotrain's `train` against TRL's SFTTrainer (packing "bfd", padding-free, assistant-only loss) under torchrun.
   Printed: each one's held-out loss (zerotrain's validation split, per learned token, evaluated by the same code
   on both final models) and training tokens per second. Goal: held-out loss within 2%, tokens/s >= TRL's.

    .venv/bin/python bench/sft_vs_trl.py [--conversations 2000] [--steps 30] [--seq-len 512] [--skip-training]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.chat import ChatTemplate, Skipped, read_conversation
from data_pipeline.config import ChatConfig

REPO = Path(__file__).resolve().parents[1]
SMOLLM = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
SHAREGPT = REPO / "data" / "sharegpt" / "sharegpt.jsonl"
SHAREGPT_NAMES = ChatConfig(messages_field="conversations", role_field="from", content_field="value",
                            roles={"human": "user", "gpt": "assistant"})
# SmolLM2's ChatML template with TRL-style generation markers around each reply and its end of turn.
MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def conversations(count: int) -> list[list[dict]]:
    """The first `count` ShareGPT conversations zerotrain trains on whole (every turn learned as TRL would)."""
    kept = []
    with open(SHAREGPT) as f:
        for i, line in enumerate(f):
            try:
                c = read_conversation(json.loads(line), f"row {i}", SHAREGPT_NAMES)
            except Skipped:
                continue
            if c.messages[0]["role"] == "user" and all(m["role"] in ("user", "assistant") for m in c.messages):
                kept.append(c.messages)
            if len(kept) == count:
                break
    return kept


def trl_labels(rows: list[dict], tokenizer, **config) -> list[tuple[list[int], list[bool]]]:
    """TRL's own dataset preparation: each row's input ids and learned tokens (labels != -100)."""
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM)
    args = SFTConfig(output_dir="/tmp/trl-masks", max_length=None, packing=False, report_to=[], use_cpu=True,
                     bf16=False, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [(r["input_ids"], [label != -100 for label in r["labels"]]) for r in trainer.train_dataset]


def compare_masks(count: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    chats = conversations(count)
    ours = ChatTemplate(tokenizer, None, str(SMOLLM))
    cases = {
        "conversations, assistant turns (assistant_only_loss)": (
            [{"messages": m} for m in chats], {"assistant_only_loss": True, "chat_template_path": _marked_file()}),
        "plain prompt/completion (completion_only_loss)": (
            [{"prompt": m[0]["content"], "completion": m[1]["content"]} for m in chats],
            {"completion_only_loss": True}),
    }
    for name, (rows, config) in cases.items():
        theirs = trl_labels(rows, tokenizer, **config)
        same_ids = same_learned = learned = 0
        for row, (ids, mask) in zip(rows, theirs):
            mine_ids, mine_learned = ours.render(read_conversation(row, "row", ChatConfig()), 10**9)
            same_ids += mine_ids.tolist() == list(ids)
            same_learned += mine_learned.tolist() == mask
            learned += sum(mask)
        print(f"{name}: {len(rows)} examples, {learned:,} learned tokens; identical input ids {same_ids}/{len(rows)}, "
              f"identical learned tokens {same_learned}/{len(rows)}")


def _marked_file() -> str:
    path = Path("/tmp/chatml-generation-markers.jinja")
    path.write_text(MARKED)
    return str(path)


TRL_WORKER = r'''
import json, os, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
spec = json.loads(sys.argv[1])
rows = [json.loads(line) for line in open(spec["rows"])]
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 1:
            self.start = time.perf_counter()
    def on_train_end(self, args, state, control, **kw):
        self.seconds = time.perf_counter() - self.start
clock = Clock()
args = SFTConfig(output_dir=spec["out"], max_length=spec["seq_len"], packing=True, packing_strategy="bfd",
                 assistant_only_loss=True, chat_template_path=spec["template"], per_device_train_batch_size=spec["micro"],
                 gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
                 lr_scheduler_type="cosine", warmup_steps=spec["warmup"], weight_decay=0.0, adam_beta2=0.999,
                 max_grad_norm=1.0, bf16=True, logging_steps=1, save_strategy="no", report_to=[], seed=1234,
                 deepspeed=spec["deepspeed"], use_cpu=True, dataloader_drop_last=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     callbacks=[clock])
trainer.train()
if trainer.args.process_index == 0:
    trainer.save_model(spec["out"] + "/final")
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset)
    json.dump({"seconds": clock.seconds, "steps": spec["steps"] - 1, "log": trainer.state.log_history},
              open(spec["out"] + "/timing.json", "w"))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    compare_masks(args.conversations)


if __name__ == "__main__":
    main()
