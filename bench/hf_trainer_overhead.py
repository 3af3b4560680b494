"""Throughput of zerotrain's training loop against Hugging Face transformers' `Trainer` running DeepSpeed.

Both train the same model (configs/demo.yaml: a 16.9M Llama) with the same DeepSpeed config (the dict
`trainer.engine.deepspeed_config.deepspeed_config` makes from the same zerotrain config, handed to
`TrainingArguments(deepspeed=...)`), the same packed token samples (the prepared shards' `PackedDataset`,
fed to `Trainer` as {input_ids, labels}), the same micro- and global batch and loader workers, on the same
number of ranks (started by `torchrun`). The steps after `--warmup` are timed: for zerotrain from the
windows in its metrics.jsonl (log_every = warmup), for `Trainer` by a callback at every step's end. The two
are run alternately, `--repeats` times each; the ratio of median tokens/s (zerotrain / Trainer) is the figure,
beside the ratio of the best `--warmup`-step windows (other load on a shared machine only slows a window down).

On CPU, `Trainer` runs DeepSpeed only with `TrainingArguments(use_cpu=True)`. Without it (transformers 5.24,
accelerate 1.15, under torchrun) bf16 is refused ("ValueError: Your setup doesn't support bf16/gpu. You need to
assign use_cpu if you want to train the model on CPU."), and in fp32 accelerate, finding no GPU backend, counts
one process: "ds train_batch_size=16 vs hf train_batch_size (calculated)=8". With it, accelerate starts gloo and
still hands the model to a DeepSpeedEngine. The effective DeepSpeed config of `Trainer`'s engine is compared with
zerotrain's and any difference printed. Not the same, and not in the timing's way: `Trainer` gives DeepSpeed one
parameter group (zerotrain two: no weight decay on norms) and its own linear LR schedule.

    .venv/bin/python bench/hf_trainer_overhead.py [--config configs/demo.yaml] [--steps 35] [--warmup 5] [--repeats 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(args, run_dir: Path) -> list[str]:
    return [f"run.output_dir={run_dir}", f"train.max_steps={args.steps}", f"train.log_every={args.warmup}",
            "eval.every=0", "checkpoint.every=0", "optim.warmup_steps=1",
            f"launch.nproc_per_node={args.nproc}"]


def zerotrain_tokens_per_s(args, workdir: Path) -> tuple[float, float]:
    """The real CLI; tokens/s over the log windows after the warm-up steps (validation and the final save come
    after the last window and are not in it), and the best window's."""
    run_dir = workdir / f"zt{len(list(workdir.iterdir()))}"
    sets = overrides(args, run_dir)
    subprocess.run([sys.executable, "-m", "launcher.cli", "train", args.config,
                    *[a for s in sets for a in ("--set", s)]], cwd=REPO, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "perf/step_s" in r]
    timed = [(r["step"] - p["step"], r["perf/step_s"]) for p, r in zip(windows, windows[1:]) if p["step"] >= args.warmup]
    cfg = resolved(args, run_dir)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    mean = sum(n for n, _ in timed) * tokens_per_step / sum(n * step_s for n, step_s in timed)
    return mean, max(tokens_per_step / step_s for _, step_s in timed)


def resolved(args, run_dir: Path):
    from trainer.config import load_config

    return load_config(args.config, overrides(args, run_dir))


def hf_tokens_per_s(args, workdir: Path) -> dict:
    """`Trainer` on `args.nproc` ranks under torchrun (this script's --worker mode); rank 0's JSON result."""
    out = workdir / f"hf{len(list(workdir.iterdir()))}.json"
    threads = str(max(1, (os.cpu_count() or 2) // args.nproc))  # what zerotrain's launcher gives each rank
    env = {**os.environ, "OMP_NUM_THREADS": threads, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", str(out), "--config", args.config, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]  # no --nproc: torchrun would take it for --nproc-per-node
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"Trainer run failed ({done.returncode}):\n{done.stderr[-8000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# the Trainer side (one rank, started by torchrun)


class LmSamples:
    """The prepared packed samples of seq_len + 1 tokens as Trainer's dicts. transformers' causal-LM loss shifts
    the labels itself, so labels = input_ids: the same seq_len tokens go through the model (seq_len - 1 of them
    predicted, against zerotrain's seq_len)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        inputs = self.dataset[i][:-1]
        return {"input_ids": inputs, "labels": inputs}


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """perf_counter at the end of every optimizer step (CPU: the step is done when the call returns)."""

        def __init__(self):
            self.ends = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = time.perf_counter()

    return StepClock()


def training_arguments(cfg, ds_config: dict, output_dir: str):
    """Trainer's arguments that DeepSpeed's config must agree with (Trainer refuses mismatches), the rest as
    zerotrain runs: no saving, no evaluation, logging (a host sync) as often as zerotrain's."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=output_dir, deepspeed=ds_config, use_cpu=True, bf16=t.precision == "bf16",
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=t.max_steps, learning_rate=t.lr, adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=1e-8,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip, warmup_steps=1, logging_steps=t.log_every,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, seed=cfg.run.seed,
        dataloader_num_workers=cfg.data.num_workers, dataloader_drop_last=True)


def config_differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """Keys of our DeepSpeed config whose value differs in the engine Trainer built."""
    diffs = []
    for key, value in ours.items():
        other = theirs.get(key, "<missing>")
        if isinstance(value, dict) and isinstance(other, dict):
            diffs += config_differences(value, other, f"{prefix}{key}.")
        elif value != other and not (isinstance(value, (list, tuple)) and list(value) == list(other or [])):
            diffs.append(f"{prefix}{key}: ours {value!r}, Trainer's {other!r}")
    return diffs


def fresh_model(cfg, vocab_size: int):
    """zerotrain's initial model (trainer.model.build.build_model without init_from: same seed, same config), built
    with transformers directly so that this script does not follow that module's signature."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.run.seed)
    config = AutoConfig.for_model(cfg.model.type, **cfg.model.config, vocab_size=vocab_size)
    return AutoModelForCausalLM.from_config(config)


def worker(args) -> None:
    import torch.distributed as dist
    from transformers import Trainer

    from data_pipeline import Manifest, packed_sources
    from trainer.engine.deepspeed_config import deepspeed_config

    out = Path(args.worker)
    args.nproc = int(os.environ["WORLD_SIZE"])
    cfg = resolved(args, out.parent / "hf-run")
    manifest = Manifest.load(cfg.data.prepared_dir)
    model = fresh_model(cfg, manifest.vocab_size)
    ds_config = deepspeed_config(cfg, sum(p.numel() for p in model.parameters()))
    clock = step_clock()
    trainer = Trainer(model=model, args=training_arguments(cfg, json.loads(json.dumps(ds_config)), str(out.parent)),
                      train_dataset=LmSamples(packed_sources(manifest, "train", cfg.data.seq_len)), callbacks=[clock])
    trainer.train()
    engine = trainer.model_wrapped
    if dist.get_rank() == 0:
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        bounds = range(args.warmup, args.steps + 1, args.warmup)  # zerotrain's log windows
        windows = [clock.ends[b] - clock.ends[a] for a, b in zip(bounds, bounds[1:])]
        out.write_text(json.dumps({
            "tokens_per_s": (args.steps - args.warmup) * tokens_per_step / sum(windows),
            "best_window": max(args.warmup * tokens_per_step / seconds for seconds in windows),
            "engine": type(engine).__name__, "world_size": dist.get_world_size(),
            "config_differences": config_differences(ds_config, engine.config)}))
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (also zerotrain's log_every)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one Trainer rank, result to this file
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (zerotrain's log windows must end on it)")
    if args.worker:
        return worker(args)
    subprocess.run([sys.executable, "-m", "launcher.cli", "prepare", args.config], cwd=REPO, check=True,
                   capture_output=True)
    ours, theirs, ours_best, theirs_best = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            hf = hf_tokens_per_s(args, Path(tmp))
            theirs.append(hf["tokens_per_s"])
            theirs_best.append(hf["best_window"])
            mean, best = zerotrain_tokens_per_s(args, Path(tmp))
            ours.append(mean)
            ours_best.append(best)
            print(f"repeat {i + 1}: Trainer ({hf['engine']}, {hf['world_size']} ranks) {theirs[-1]:,.0f} tokens/s "
                  f"(best {args.warmup}-step window {theirs_best[-1]:,.0f}), zerotrain {ours[-1]:,.0f} "
                  f"(best {ours_best[-1]:,.0f})", flush=True)
    print("DeepSpeed config differences (ours vs Trainer's engine):", "; ".join(hf["config_differences"]) or "none")
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"zerotrain / HF Trainer+DeepSpeed throughput: {ratio:.3f} ({statistics.median(ours):,.0f} vs "
          f"{statistics.median(theirs):,.0f} tokens/s, medians over steps {args.warmup + 1}-{args.steps}, "
          f"{args.nproc} ranks, {args.config}); best windows: {max(ours_best) / max(theirs_best):.3f} "
          f"({max(ours_best):,.0f} vs {max(theirs_best):,.0f}: the least disturbed by other load)")


if __name__ == "__main__":
    main()
