"""What summing gradients in fp32 under bf16 costs (train.grad_accum_dtype: fp32, the default at ZeRO 1-3)
against bf16 sums, per ZeRO stage:

1. Speed: tokens/s of the real CLI training the demo model (bf16, 2 ranks, 4 micro-batches per step), medians
   of the logged perf/tokens_per_s after the first steps, fp32 sums / bf16 sums.
2. Memory: model states per GPU of the 1B preset on 8 GPUs by the memory model (trainer/memory.py, which
   tests/launcher/test_plan.py checks against DeepSpeed's live tensors with the default fp32 sums; its bf16-sum figures
   are the model the same test checked before fp32 sums became the default), fp32 sums vs bf16 sums.

    .venv/bin/python bench/grad_accumulation.py [--steps 8]
"""

from __future__ import annotations

import argparse

from demo_runs import REPO, prepare, train

from trainer.config import load_config
from trainer.memory import GiB, Option, architecture, estimate

STAGES = (1, 2, 3)


def tokens_per_s(stage: int, dtype: str, steps: int) -> float:
    run = train([f"zero.stage={stage}", f"train.grad_accum_dtype={dtype}", "train.micro_batch_size=4",
                 "train.global_batch_size=32", f"train.max_steps={steps}"])
    return run.median("perf/tokens_per_s", after=2)


def states_gib(stage: int, dtype: str) -> float:
    cfg = load_config(REPO / "configs" / "llama_1b.yaml", [f"zero.stage={stage}", f"train.grad_accum_dtype={dtype}"])
    est = estimate(cfg, architecture(cfg), Option(stage), 1, 8)
    return (est.states + est.resident + max(est.step, 0)) / GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    prepare()
    for stage in STAGES:
        fp32, bf16 = (tokens_per_s(stage, dtype, args.steps) for dtype in ("fp32", "bf16"))
        print(f"ZeRO {stage}: tokens/s summing in fp32 / in bf16 {fp32 / bf16:.3f} ({fp32:.0f} vs {bf16:.0f}); "
              f"1B preset on 8 GPUs, model states {states_gib(stage, 'fp32'):.2f} vs "
              f"{states_gib(stage, 'bf16'):.2f} GiB per GPU", flush=True)


if __name__ == "__main__":
    main()
