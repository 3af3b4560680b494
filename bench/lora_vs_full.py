"""LoRA (model.lora) against full fine-tuning in zerotrain, and zerotrain's LoRA against TRL's SFTTrainer with PEFT
(TRL is a benchmark-only dependency: `pip install trl==1.16.0` into the venv).

The same model (SmolLM2-135M-Instruct), data (the first --conversations ShareGPT conversations of
bench/sft_vs_trl.py, prepared by `zerotrain prepare` of configs/sft_smollm2.yaml; 5% held out by zerotrain's hash),
steps, packed samples (8 a step), sequence length and schedule (configs/sft_smollm2.yaml's warmup and cosine) for
every run; 2 CPU ranks, bf16, ZeRO --zero-stage (2). LoRA: rank 16, alpha 32, all-linear (every linear layer of the
blocks), at --lora-lr-factor (10) times the full run's learning rate.

1. zerotrain full fine-tuning against zerotrain LoRA, each from its run folder:
   - model states per rank: the weights (16-bit, the frozen base's included) and the gradients (summed in fp32:
     the rank's partition at stages 2-3), of the parameter counts the run trained (its checkpoint's param_shapes)
     and holds (zerotrain's memory model, trainer/memory.py, built on the meta device), and the optimizer states
     as the rank's checkpoint file holds them (fp32 master weights and both Adam moments of its partition);
     DeepSpeed's gradient reduce buckets (alive during backward) beside them;
   - peak RSS per rank (mem/peak_rss_gib: rank 0's in metrics.jsonl, the others' in logs/rankN.log) at the last
     step, and over the whole run (its final validation and save included);
   - the median step time after the first step (perf/step_s, every step logged);
   - the held-out loss after the last step (val/loss: zerotrain's validation at the end, the same batches).
   Goals, LoRA/full: model states <= 0.2x, step time <= 0.75x.
2. zerotrain LoRA against TRL's SFTTrainer + PEFT under torchrun: the same LoraConfig (zerotrain's, of the same
   model.lora; the adapters drawn from the same seed), DeepSpeed config dict (the one zerotrain makes for the LoRA
   run), learning rate and schedule, and zerotrain's packed samples in zerotrain's order (bench/sft_vs_trl.py's
   `--trl-batches same`). TRL's gradient checkpointing (its SFTConfig's default) is off, as zerotrain's is.
   Printed: training tokens per second after the first step (not padding) of each, their ratio (goal >= 1), and
   the largest differences of their per-step gradient norms and training losses: on the same batches from the same
   adapters they should agree (the losses less closely: each trainer averages its ranks' losses its own way).

    .venv/bin/python bench/lora_vs_full.py [--conversations 1000] [--steps 20] [--seq-len 512] [--zero-stage 2]
                                          [--lora-lr-factor 10] [--skip-trl]
"""
import argparse
import json
import math
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from sft_vs_trl import CONFIG, REPO, cli, conversations, prepare, run_trl, tokens_per_s, zerotrain, zerotrain_batches
from trainer.config import load_config
from trainer.memory import Option, architecture, estimate
from trainer.observe.metrics import read_records
from trainer.tasks.sft import validation_batches

LORA = "{rank: 16, alpha: 32, target_modules: all-linear}"
MiB = 2**20
RSS = "mem/peak_rss_gib"


@dataclass
class Run:
    """What one finished zerotrain run measured."""

    name: str
    lr: float
    params: int  # held by every rank (all: stages 0-2)
    trained: int  # from the checkpoint
    expected_trained: int  # zerotrain's memory model
    weights: int  # bytes per rank
    gradients: int
    optimizer: list[int]  # per rank: its checkpoint file
    expected_optimizer: int
    buckets: int
    peak_rss: list[tuple[float, float]]  # per rank: (at the last step, over the whole run), GiB
    step_s: float
    val_loss: float
    records: list[dict]

    def states(self, rank: int) -> int:
        return self.weights + self.gradients + self.optimizer[rank]


def measure(name: str, sets: list[str]) -> Run:
    """The run zerotrain's `train` just finished with the --set overrides `sets` of CONFIG."""
    cfg = load_config(CONFIG, sets)
    folder, ranks = cfg.run_dir, cfg.launch.nproc_per_node
    records = read_records(folder / "metrics.jsonl")
    steps = [r for r in records if "perf/step_s" in r]
    arch = architecture(cfg)
    est = estimate(cfg, arch, Option(cfg.zero.stage), cfg.launch.nnodes, ranks)
    checkpoint = folder / "checkpoints" / f"step_{cfg.train.max_steps:08d}"
    states = torch.load(next(checkpoint.glob("*model_states.pt")), map_location="cpu", mmap=True, weights_only=False)
    trained = sum(shape.numel() for group in states["param_shapes"] for shape in group.values())
    optimizer = [next(checkpoint.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")).stat().st_size
                 for r in range(ranks)]
    peak_rss = [rss_of(records, steps[-1]["step"])] + [rss_in_log(folder / "logs" / f"rank{r}.log", steps[-1]["step"])
                                                      for r in range(1, ranks)]
    return Run(name, cfg.optim.lr, params=arch.params, trained=trained, expected_trained=arch.trainable,
               weights=est.params, gradients=est.grads, optimizer=optimizer, expected_optimizer=est.optimizer,
               buckets=est.transient, peak_rss=peak_rss,
               step_s=statistics.median(r["perf/step_s"] for r in steps if r["step"] > 1),
               val_loss=next(r["val/loss"] for r in reversed(records) if "val/loss" in r), records=steps)


def rss_of(records: list[dict], last: int) -> tuple[float, float]:
    """Rank 0's peak RSS at the last step's record and over the run (metrics.jsonl)."""
    trained = next(r[RSS] for r in records if r["step"] == last and "perf/step_s" in r)
    return trained, max(r[RSS] for r in records if RSS in r)


def rss_in_log(path: Path, last: int) -> tuple[float, float]:
    """Another rank's peak RSS from its log: its first line at the last step is the step's (the save's follows)."""
    found = [(int(m[1]), float(m[2])) for m in re.finditer(rf"step\s+(\d+) .*?{RSS} (\S+)", path.read_text())]
    return next(rss for step, rss in found if step == last), max(rss for _, rss in found)


def mib(n: float) -> str:
    return f"{n / MiB:,.1f}"


def report_memory(full: Run, lora: Run, stage: int) -> None:
    print(f"\n  per rank, MiB      weights (all {full.params / 1e6:.2f}M / {lora.params / 1e6:.2f}M, bf16) + "
          "gradients (fp32) + optimizer states (checkpoint) = model states; DeepSpeed gradient buckets; "
          "peak RSS at the last step / over the run (GiB)")
    ranks = len(full.optimizer)
    for run in (full, lora):
        for r in range(ranks):
            (rss, rss_all) = run.peak_rss[r]
            print(f"  {run.name:<5} rank {r}: {mib(run.weights):>8} + {mib(run.gradients):>7} + "
                  f"{mib(run.optimizer[r]):>7} = {mib(run.states(r)):>8}; buckets {mib(run.buckets):>7}; "
                  f"peak RSS {rss:.2f} / {rss_all:.2f}")
    for run in (full, lora):
        if run.trained != run.expected_trained:
            print(f"  PROBLEM: the {run.name} run's checkpoint trained {run.trained:,} parameters, "
                  f"zerotrain's memory model expects {run.expected_trained:,}")
        off = max(abs(size / run.expected_optimizer - 1) for size in run.optimizer)
        if off > 0.01:
            print(f"  PROBLEM: the {run.name} run's optimizer checkpoint files ({', '.join(map(mib, run.optimizer))} "
                  f"MiB) are {off:.1%} off the {mib(run.expected_optimizer)} MiB zerotrain's memory model expects")
    states = max(lora.states(r) for r in range(ranks)) / max(full.states(r) for r in range(ranks))
    with_buckets = max(lora.states(r) + lora.buckets for r in range(ranks)) / \
        max(full.states(r) + full.buckets for r in range(ranks))
    rss = max(p[0] for p in lora.peak_rss) / max(p[0] for p in full.peak_rss)
    floor = lora.weights / (full.weights + full.gradients + full.expected_optimizer)
    print(f"  LoRA/full, the larger rank: model states {states:.3f}x (goal <= 0.2x: "
          f"{'met' if states <= 0.2 else 'not met'}; LoRA's 16-bit weights alone are {floor:.3f}x at ZeRO {stage}), "
          f"with the buckets {with_buckets:.3f}x, peak RSS at the last step {rss:.3f}x")


def compare(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # prepared afresh: `zerotrain prepare` refuses a folder of another conversations.jsonl (rewritten by every run)
    subprocess.run(["rm", "-rf", *(str(out / name) for name in ("prepared", "full", "lora", "trl"))], check=True)
    sets = prepare(conversations(args.conversations), args.steps, args.seq_len, out) + \
        [f"zero.stage={args.zero_stage}"]
    lr = load_config(CONFIG, sets).optim.lr
    runs = {"full": sets + [f"run.output_dir={out / 'full'}"],
            "LoRA": sets + [f"run.output_dir={out / 'lora'}", f"model.lora={LORA}",
                            f"optim.lr={lr * args.lora_lr_factor:g}"]}
    for name, run in runs.items():
        zerotrain("train", CONFIG, *cli(run))
    full, lora = (measure(name, run) for name, run in runs.items())

    from data_pipeline import ChatData

    chat = ChatData.load(out / "prepared")
    print(f"\nzerotrain full fine-tuning vs LoRA (rank 16, alpha 32, all-linear; {lora.trained / 1e6:.2f}M trained "
          f"parameters): {args.steps} steps of 8 packed {args.seq_len}-token samples, 2 CPU ranks, "
          f"ZeRO {args.zero_stage}, bf16; lr {full.lr:g} full, {lora.lr:g} LoRA ({args.lora_lr_factor:g}x)")
    report_memory(full, lora, args.zero_stage)
    ratio = lora.step_s / full.step_s
    print(f"  median step time after the first step: full {full.step_s:.2f} s, LoRA {lora.step_s:.2f} s "
          f"({ratio:.3f}x; goal <= 0.75x: {'met' if ratio <= 0.75 else 'not met'})")
    cfg = load_config(CONFIG, sets)
    samples = validation_batches(chat, cfg) * cfg.train.micro_batch_size
    print(f"  held-out loss after {args.steps} steps (val/loss, per learned token of the first {samples} validation "
          f"samples): full {full.val_loss:.4f}, LoRA {lora.val_loss:.4f} "
          f"({lora.val_loss / full.val_loss - 1:+.2%})")
    if args.skip_trl:
        return

    rows = out / "train-samples.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in zerotrain_batches(chat, args.steps)))
    theirs = run_trl(rows, args.steps, args.seq_len, "same", out / "trl", runs["LoRA"])
    ours = tokens_per_s(out / "lora", chat, args.seq_len)
    trl = {r["step"]: r for r in json.loads((out / "trl" / "timing.json").read_text())["log"] if "loss" in r}
    both = [(r, trl[r["step"]]) for r in lora.records if r["step"] in trl]
    loss_gap = max((abs(z["train/loss"] - t["loss"]) for z, t in both), default=math.nan)
    norm_gap = max((abs(z["train/grad_norm"] / t["grad_norm"] - 1) for z, t in both), default=math.nan)
    print("\nzerotrain LoRA vs TRL SFTTrainer + PEFT (the same LoraConfig, DeepSpeed config, lr, schedule and "
          "batches; TRL's gradient checkpointing off):")
    print(f"  training tokens/s after the first step (not padding): zerotrain {ours:.0f}, TRL {theirs:.0f} "
          f"({ours / theirs:.2f}x; goal >= 1: {'met' if ours / theirs >= 1 else 'not met'})")
    last = trl.get(args.steps, {}).get("loss", math.nan)
    print(f"  per step over {len(both)} steps, the largest difference: gradient norm {norm_gap:.2%}, training loss "
          f"{loss_gap:.4f} (each trainer's own mean over the ranks; the last: zerotrain "
          f"{lora.records[-1]['train/loss']:.4f}, TRL {last:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=2)
    parser.add_argument("--lora-lr-factor", type=float, default=10.0)
    parser.add_argument("--skip-trl", action="store_true", help="zerotrain's two runs only")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-lora-vs-full")
    compare(parser.parse_args())


if __name__ == "__main__":
    main()
