"""Packed vs padded supervised fine-tuning: learned tokens per second and held-out loss, measured in one run.

The same real conversations (configs/sft_smollm2.yaml: ShareGPT, SmolLM2-135M-Instruct, 2 CPU ranks at ZeRO 2)
are prepared twice at --seq-len: packed (several conversations per sample, best-fit decreasing, kept apart by
restarting positions) and padded (data.packing: false, one conversation per sample). Each trains --steps steps of
the same global batch of samples; both exports (and the starting model) are scored on the same held-out samples.
Learned tokens per second: the learned tokens of a mean sample (from the prepared data) x samples per second of
training (summary.json, start-up excluded). The held-out loss is per learned token, over the first
--held-out-samples packed validation samples. Goal: packed >= 1.5 x padded.

    .venv/bin/python bench/sft_packing.py [--steps 6] [--seq-len 2048] [--out runs/bench-sft-packing]
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipeline import ChatData
from sft_vs_trl import SMOLLM, held_out_loss  # the same held-out measure as the TRL comparison

ZEROTRAIN = Path(sys.executable).with_name("zerotrain")
CONFIG = "configs/sft_smollm2.yaml"


def run(mode: str, out: Path, steps: int, seq_len: int) -> dict:
    packing = mode == "packed"
    sets = [f"run.output_dir={out / mode}", f"data.prepared_dir={out / ('prepared-' + mode)}",
            f"data.seq_len={seq_len}", f"data.packing={str(packing).lower()}", f"train.max_steps={steps}",
            "eval.every=0", "eval.at_start=false", "data.chat.sample_prompts=0", "checkpoint.every=0",
            "train.log_every=1"]
    args = [a for s in sets for a in ("--set", s)]
    shutil.rmtree(out / mode, ignore_errors=True)
    subprocess.run([ZEROTRAIN, "prepare", CONFIG, *args], check=True)
    subprocess.run([ZEROTRAIN, "train", CONFIG, *args], check=True)
    subprocess.run([ZEROTRAIN, "export", out / mode, out / mode / "export"], check=True)
    chat = ChatData.load(out / f"prepared-{mode}")
    summary = json.loads((out / mode / "summary.json").read_text())
    train = chat.data["splits"]["train"]
    samples_per_s = summary["tokens_per_s"] / seq_len
    return {"learned_per_sample": float(np.mean(chat.learned_tokens("train"))), "samples_per_s": samples_per_s,
            "learned_tokens_per_s": samples_per_s * float(np.mean(chat.learned_tokens("train"))),
            "real_share": train["tokens"] / (train["samples"] * seq_len), "samples": train["samples"],
            "conversations": train["examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sft-packing"))
    parser.add_argument("--held-out-samples", type=int, default=32)
    args = parser.parse_args()
    results = {mode: run(mode, args.out, args.steps, args.seq_len) for mode in ("padded", "packed")}
    held_out = ChatData.load(args.out / "prepared-packed")  # the same samples for both models
    for mode, r in results.items():
        r["val_end"] = held_out_loss(args.out / mode / "export", held_out, args.held_out_samples)
    start = held_out_loss(SMOLLM, held_out, args.held_out_samples)
    print(f"\nShareGPT on SmolLM2-135M-Instruct, {args.seq_len}-token samples, {args.steps} steps, 2 CPU ranks")
    print(f"held-out loss of the starting model: {start:.4f} (the first {args.held_out_samples} packed "
          "validation samples, per learned token)")
    print(f"{'':8} {'conversations':>13} {'samples':>8} {'real tokens':>11} {'learned/sample':>14} "
          f"{'samples/s':>9} {'learned tok/s':>13} {'held-out loss':>13}")
    for mode, r in results.items():
        print(f"{mode:8} {r['conversations']:>13,} {r['samples']:>8,} {r['real_share']:>11.1%} "
              f"{r['learned_per_sample']:>14.0f} {r['samples_per_s']:>9.3f} {r['learned_tokens_per_s']:>13.0f} "
              f"{r['val_end']:>13.4f}")
    ratio = results["packed"]["learned_tokens_per_s"] / results["padded"]["learned_tokens_per_s"]
    print(f"packed / padded learned tokens per second: {ratio:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
