"""zerotrain's supervised fine-tuning against TRL's SFTTrainer (the anchor; TRL is a benchmark-only dependency:
`pip install trl==1.16.0` into the venv).

1. The tokens learned, compared token for token on real data where TRL can make a mask:
   - conversations (the first 500 ShareGPT conversations that start with a question, with user and assistant
     turns only, none left out by zerotrain): TRL's `assistant_only_loss` needs
     `{% generation %}` markers, which SmolLM2's ChatML template lacks (TRL ships marked templates for a few other
     families only), so TRL gets the same ChatML template with markers around each reply and its end of turn;
     zerotrain renders SmolLM2's own template (no markers: rendered prefixes).
   - plain prompt/completion pairs (each ShareGPT conversation's first question and reply): TRL's
     `completion_only_loss` against zerotrain's prompt/completion reading.
   Both must give the same input ids and the same learned tokens.
2. Training, with the same model (SmolLM2-135M-Instruct), data (the first --conversations such conversations;
   5% held out by zerotrain's hash for both), sequence length, schedule (configs/sft_smollm2.yaml's warmup and
   cosine, zerotrain's function given to TRL's Trainer) and DeepSpeed config (the dict zerotrain makes, handed
   to TRL's TrainingArguments), 2 CPU ranks, ZeRO 2, bf16: zerotrain's `train` against TRL's SFTTrainer under
   torchrun; TRL's gradient checkpointing (SFTConfig turns it on by default) off, as zerotrain's is. The
   batches (--trl-batches):
   - `same` (default): TRL trains on zerotrain's packed samples in zerotrain's order (each sample's
     conversations as TRL's padding-free rows: input ids, labels, sequence lengths; Trainer's sequential
     sampler gives rank r the r-th micro-batch of each step, as zerotrain does): the two trainers see the same
     tokens at every step, so the losses compare the training itself.
   - `own`: TRL packs the conversations itself (packing "bfd", assistant-only loss) and draws them in its own
     random order: another subset of the data in 30 steps, so the held-out loss differs by the luck of the draw.
   Printed: each one's held-out loss (the prepared validation split, per learned token, by the same code on both
   final models) and training tokens per second after the first step (not padding). Goal: held-out loss within
   2%, tokens/s >= TRL's.

    .venv/bin/python bench/sft_vs_trl.py [--conversations 2000] [--steps 30] [--seq-len 512] [--skip-training]
                                        [--trl-batches same|own]
"""
import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.chat import ChatTemplate, Skipped, read_conversation
from data_pipeline.config import ChatConfig
from trainer.config import load_config
from trainer.engine.deepspeed_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
SMOLLM = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
SHAREGPT = REPO / "data" / "sharegpt" / "sharegpt.jsonl"
SHAREGPT_NAMES = ChatConfig(messages_field="conversations", role_field="from", content_field="value",
                            roles={"human": "user", "gpt": "assistant"})
# SmolLM2's ChatML template with TRL-style generation markers around each reply and its end of turn.
MARKED = REPO / "configs" / "templates" / "chatml-generation.jinja"
CONFIG = REPO / "configs" / "sft_smollm2.yaml"
ZEROTRAIN = Path(sys.executable).with_name("zerotrain")
HELD_OUT = 0.05  # of the conversations, by zerotrain's hash: validation for both trainers


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
            [{"messages": m} for m in chats], {"assistant_only_loss": True, "chat_template_path": str(MARKED)}),
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


TRL_WORKER = r'''
import json, sys, time
import torch
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trainer.optim import warmup_cosine
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
class SameSchedule(SFTTrainer):
    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            factor = warmup_cosine(spec["warmup"], spec["steps"], spec["min_lr_rate"])
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler
same = spec["batches"] == "same"
batches = dict(packing=False, padding_free=True, dataset_kwargs={"skip_prepare_dataset": True},
               train_sampling_strategy="sequential") if same else \
    dict(packing=True, packing_strategy="bfd", assistant_only_loss=True, chat_template_path=spec["template"])
clock = Clock()
args = SFTConfig(output_dir=spec["out"], max_length=None if same else spec["seq_len"], **batches,
                 per_device_train_batch_size=spec["micro"], gradient_accumulation_steps=1, max_steps=spec["steps"],
                 learning_rate=spec["lr"], weight_decay=0.0, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                 bf16=True, logging_steps=1, save_strategy="no", report_to=[], seed=spec["seed"],
                 deepspeed=spec["deepspeed"], use_cpu=True, dataloader_drop_last=True, disable_tqdm=True,
                 gradient_checkpointing=False)  # SFTConfig's default is on; zerotrain's runs recompute nothing
peft = None
if spec["lora"]:  # PEFT's LoraConfig as zerotrain makes it of model.lora; the adapters drawn from the seed, as its
    from trainer.config import LoraSection
    from trainer.model.lora import lora_config
    peft = lora_config(LoraSection(**spec["lora"]), "sft")
    torch.manual_seed(spec["seed"])
trainer = SameSchedule(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                       callbacks=[clock], peft_config=peft)
trainer.train()
trainer.save_model(spec["out"] + "/final")  # every rank: Trainer writes from the main one
if trainer.args.process_index == 0:
    json.dump({"seconds": clock.seconds, "steps": spec["steps"] - 1, "log": trainer.state.log_history},
              open(spec["out"] + "/timing.json", "w"))
'''


def zerotrain(*args) -> None:
    subprocess.run([ZEROTRAIN, *map(str, args)], check=True)


def cli(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def prepare(chats: list[list[dict]], steps: int, seq_len: int, out: Path) -> list[str]:
    """`chats` written to out/conversations.jsonl and prepared by zerotrain in out/prepared (HELD_OUT of them held
    out); returns the --set overrides of CONFIG for a run of `steps` steps on them into out/zerotrain that logs
    every step and validates and saves at the end only."""
    rows = out / "conversations.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    sets = [f"run.output_dir={out / 'zerotrain'}", f"data.prepared_dir={out / 'prepared'}", f"data.sources=[{rows}]",
            "data.chat={}", f"data.seq_len={seq_len}", f"data.validation_fraction={HELD_OUT}",
            f"train.max_steps={steps}", "eval.every=0", "eval.at_start=false", "checkpoint.every=0",
            "train.log_every=1", "data.chat.sample_prompts=0"]
    zerotrain("prepare", CONFIG, *cli(sets))
    return sets


def tokens_per_s(run: Path, chat, seq_len: int) -> float:
    """A finished zerotrain run's training tokens per second after its first step (summary.json), padding not
    counted: its samples per second times a training sample's mean tokens."""
    summary = json.loads((run / "summary.json").read_text())
    train = chat.data["splits"]["train"]
    return summary["tokens_per_s"] * train["tokens"] / (train["samples"] * seq_len)


def compare_training(count: int, steps: int, seq_len: int, batches: str, out: Path) -> None:
    """Both trainers on the same conversations (the validation split held out by zerotrain's hash, for both)."""
    from data_pipeline import ChatData
    from data_pipeline.splits import split_of

    out.mkdir(parents=True, exist_ok=True)
    chats = conversations(count)
    train_rows = out / "train.jsonl"
    train_rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats
                                  if split_of(json.dumps(m), {"validation": HELD_OUT}) == "train"))
    sets = prepare(chats, steps, seq_len, out)
    subprocess.run(["rm", "-rf", str(out / "zerotrain"), str(out / "trl")], check=True)
    zerotrain("train", CONFIG, *cli(sets))
    zerotrain("export", out / "zerotrain", out / "zerotrain" / "export")
    chat = ChatData.load(out / "prepared")
    ours_tokens_per_s = tokens_per_s(out / "zerotrain", chat, seq_len)
    if batches == "same":
        train_rows = out / "train-samples.jsonl"
        train_rows.write_text("".join(json.dumps(row) + "\n" for row in zerotrain_batches(chat, steps)))
    theirs_tokens_per_s = run_trl(train_rows, steps, seq_len, batches, out / "trl")
    losses = {name: held_out_loss(folder, chat) for name, folder in
              (("zerotrain", out / "zerotrain" / "export"), ("TRL", out / "trl" / "final"))}
    print(f"\ntraining: {steps} steps of 8 packed {seq_len}-token samples, 2 CPU ranks, ZeRO 2, bf16; "
          f"TRL's batches: {'zerotrain' if batches == 'same' else 'its own'}")
    print(f"  held-out loss (per learned token, {chat.data['splits']['validation']['examples']} conversations): "
          f"zerotrain {losses['zerotrain']:.4f}, TRL {losses['TRL']:.4f} "
          f"({losses['zerotrain'] / losses['TRL'] - 1:+.2%})")
    print(f"  training tokens/s (not padding): zerotrain {ours_tokens_per_s:.0f}, TRL {theirs_tokens_per_s:.0f} "
          f"({ours_tokens_per_s / theirs_tokens_per_s:.2f}x)")


def zerotrain_batches(chat, steps: int) -> Iterator[dict]:
    """The samples of zerotrain's first `steps` steps, in its order, as TRL's padding-free rows: each conversation's
    input ids and labels (not shifted: -100 where not learned) and the conversations' lengths. A cut
    conversation's last token, which zerotrain learns to predict the first token cut off, has no label here."""
    from data_pipeline import GlobalOrder

    cfg = load_config(CONFIG, [f"train.max_steps={steps}"])
    samples = chat.split("train")
    order = GlobalOrder([len(samples)], [1.0], cfg.run.seed)
    for k in range(steps * cfg.train.global_batch_size):
        s = samples[order.sample(k)]
        starts = (s["position_ids"] == 0).nonzero().flatten().tolist() + [len(s["position_ids"])]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        learned = s["labels"] >= 0  # at a token's position: the next token is learned
        if not learned[starts[-2]:].any():  # padding (a document of its own): every conversation learns something
            lengths.pop()
        used = sum(lengths)
        labels = torch.where(torch.cat([torch.zeros(1, dtype=torch.bool), learned[:-1]]), s["input_ids"], -100)
        yield {"input_ids": s["input_ids"][:used].tolist(), "labels": labels[:used].tolist(), "seq_lengths": lengths}


def run_trl(rows: Path, steps: int, seq_len: int, batches: str, out: Path, sets: list[str] = ()) -> float:
    """TRL's SFTTrainer on 2 ranks (torchrun) with zerotrain's DeepSpeed config for the run; its tokens/s after
    the first step. `sets`: --set overrides of CONFIG that zerotrain's run had (its lr, ZeRO stage; with
    model.lora, TRL trains PEFT's adapters as zerotrain makes them)."""
    cfg = load_config(CONFIG, [*sets, f"train.max_steps={steps}"])
    lora = cfg.model.lora
    spec = {"rows": str(rows), "model": str(SMOLLM), "out": str(out), "seq_len": seq_len, "steps": steps,
            "micro": cfg.train.micro_batch_size, "lr": cfg.optim.lr, "warmup": cfg.optim.warmup_steps,
            "template": str(MARKED), "min_lr_rate": cfg.optim.min_lr_ratio, "seed": cfg.run.seed,
            # Trainer checks that its arguments agree with the DeepSpeed config
            "deepspeed": zerotrain_deepspeed(cfg), "batches": batches,
            "lora": lora.model_dump(mode="json") if lora else None}
    worker = out / "trl_worker.py"
    out.mkdir(parents=True, exist_ok=True)
    worker.write_text(TRL_WORKER)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker),
                    json.dumps(spec)], check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    timing = json.loads((out / "timing.json").read_text())
    tokens = [r["num_tokens"] for r in timing["log"] if "num_tokens" in r]
    return (tokens[-1] - tokens[0]) / timing["seconds"]


def zerotrain_deepspeed(cfg) -> dict:
    """The DeepSpeed config zerotrain's engine makes for the run `cfg` (build_engine's call): its parameter count
    and, with model.lora, the trained ones size the buckets."""
    from trainer.memory import architecture

    arch = architecture(cfg)
    return deepspeed_config(cfg, arch.held(cfg.parallel.tensor), largest_parameter=max(arch.sizes),
                            trainable=arch.trainable)


def held_out_loss(folder: Path, chat, limit: int | None = None) -> float:
    """The mean cross-entropy of the learned tokens of the prepared validation split's (first `limit`) samples: the
    same code for every model compared."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    samples = chat.split("validation")
    total = count = 0.0
    with torch.no_grad():
        for i in range(min(len(samples), limit or len(samples))):
            s = samples[i]
            # No cache: transformers keeps packed conversations apart (positions restart) only without one
            logits = model(input_ids=s["input_ids"][None], position_ids=s["position_ids"][None],
                           use_cache=False).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits.float(), s["labels"], reduction="sum"))
            count += int((s["labels"] >= 0).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--trl-batches", choices=["same", "own"], default="same")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-sft-vs-trl")
    args = parser.parse_args()
    compare_masks(min(args.conversations, 500))
    if not args.skip_training:
        compare_training(args.conversations, args.steps, args.seq_len, args.trl_batches, args.out)


if __name__ == "__main__":
    main()
