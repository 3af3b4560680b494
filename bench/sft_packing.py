"""Packed vs padded supervised fine-tuning: learned tokens per second and held-out loss, measured in one run.

Real conversations (configs/sft_smollm2.yaml: ShareGPT, SmolLM2-135M-Instruct, 2 CPU ranks at ZeRO 2), in two
shapes: the whole multi-turn conversations, and each one's first exchange (a question and its reply, as
prompt/completion pairs: the shape of instruction-tuning data). Each is prepared twice at --seq-len: packed
(several conversations per sample, best-fit decreasing, kept apart by restarting positions) and padded
(data.packing: false, one conversation per sample), and each trains --steps steps of the same global batch of
samples. Learned tokens per second: the learned tokens of a mean sample (from the prepared data) x samples per
second of training (summary.json, start-up excluded). Held-out loss: the exports (and the starting model) scored
by the same code on the same samples (the first --held-out-samples packed validation samples), per learned token.
Goal: packed >= 1.5 x padded.

    .venv/bin/python bench/sft_packing.py [--steps 6] [--seq-len 1024] [--out runs/bench-sft-packing]
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipeline import ChatData
from sft_vs_trl import SHAREGPT, SMOLLM, held_out_loss  # the same held-out measure as the TRL comparison

ZEROTRAIN = Path(sys.executable).with_name("zerotrain")
CONFIG = "configs/sft_smollm2.yaml"


def first_exchanges(out: Path) -> Path:
    """Each ShareGPT conversation's first question and reply, as a conversational prompt/completion pair."""
    rows = out / "first-exchange.jsonl"
    with open(SHAREGPT) as f, open(rows, "w") as w:
        for line in f:
            turns = json.loads(line)["conversations"][:2]
            if [t["from"] for t in turns] == ["human", "gpt"] and all(t["value"].strip() for t in turns):
                w.write(json.dumps({"prompt": [{"role": "user", "content": turns[0]["value"]}],
                                    "completion": [{"role": "assistant", "content": turns[1]["value"]}]}) + "\n")
    return rows


def run(name: str, data: list[str], packed: bool, out: Path, steps: int, seq_len: int) -> dict:
    mode = f"{name}-{'packed' if packed else 'padded'}"
    sets = [f"run.output_dir={out / mode}", f"data.prepared_dir={out / ('prepared-' + mode)}",
            f"data.seq_len={seq_len}", f"data.packing={str(packed).lower()}", f"train.max_steps={steps}",
            "eval.every=0", "eval.at_start=false", "data.chat.sample_prompts=0", "checkpoint.every=0",
            "train.log_every=1", *data]
    args = [a for s in sets for a in ("--set", s)]
    shutil.rmtree(out / mode, ignore_errors=True)
    subprocess.run([ZEROTRAIN, "prepare", CONFIG, *args], check=True)
    subprocess.run([ZEROTRAIN, "train", CONFIG, *args], check=True)
    subprocess.run([ZEROTRAIN, "export", out / mode, out / mode / "export"], check=True)
    chat = ChatData.load(out / f"prepared-{mode}")
    summary = json.loads((out / mode / "summary.json").read_text())
    train = chat.data["splits"]["train"]
    learned = float(np.mean(chat.learned_tokens("train")))
    samples_per_s = summary["tokens_per_s"] / seq_len
    return {"learned_per_sample": learned, "samples_per_s": samples_per_s, "learned_tokens_per_s": samples_per_s *
            learned, "real_share": train["tokens"] / (train["samples"] * seq_len), "samples": train["samples"],
            "conversations": train["examples"], "export": out / mode / "export"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)  # more than the config's 5 warmup steps
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sft-packing"))
    parser.add_argument("--held-out-samples", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = {"multi-turn": [],  # the config's ShareGPT source and field names
              "first-exchange": [f"data.sources=[{first_exchanges(args.out)}]", "data.chat={skip_invalid: true}"]}
    for name, data in shapes.items():
        results = {packed: run(name, data, packed, args.out, args.steps, args.seq_len) for packed in (False, True)}
        held_out = ChatData.load(args.out / f"prepared-{name}-packed")  # the same samples for every model
        start = held_out_loss(SMOLLM, held_out, args.held_out_samples)
        print(f"\n{name} ShareGPT on SmolLM2-135M-Instruct, {args.seq_len}-token samples, {args.steps} steps of 8 "
              f"samples, 2 CPU ranks; held-out loss of the starting model {start:.4f}")
        print(f"{'':8} {'conversations':>13} {'samples':>8} {'real tokens':>11} {'learned/sample':>14} "
              f"{'samples/s':>9} {'learned tok/s':>13} {'held-out loss':>13}")
        for packed, r in results.items():
            loss = held_out_loss(r["export"], held_out, args.held_out_samples)
            print(f"{'packed' if packed else 'padded':8} {r['conversations']:>13,} {r['samples']:>8,} "
                  f"{r['real_share']:>11.1%} {r['learned_per_sample']:>14.0f} {r['samples_per_s']:>9.3f} "
                  f"{r['learned_tokens_per_s']:>13.0f} {loss:>13.4f}")
        ratio = results[True]["learned_tokens_per_s"] / results[False]["learned_tokens_per_s"]
        print(f"packed / padded learned tokens per second: {ratio:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
