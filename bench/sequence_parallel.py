"""Ulysses sequence parallelism on CPU ranks (parallel.sequence, trainer/parallel/sequence.py).

1. Activation memory per rank at a long sequence: the bytes autograd keeps for backward in one forward + loss
   of a small Llama, sequence split over 2 gloo ranks vs one rank holding it whole; each also against the
   memory model `zerotrain plan` uses (trainer/memory.py), with and without document masking.
2. Throughput: tokens/s of the real CLI training the demo data with the sequence split over 2 ranks vs 2
   data-parallel ranks at the same seq_len (medians of the logged perf/tokens_per_s after the first steps).

    .venv/bin/python bench/sequence_parallel.py [--seq-len 8192] [--train-seq-len 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys

from demo_runs import DEMO, REPO, prepare, train

sys.path.insert(0, str(REPO / "tests"))  # live_tensors: measured as tests/launcher/test_plan.py does
from live_tensors import split_activations  # noqa: E402

MODEL = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
         "model.config.max_position_embeddings=16384", "train.precision=fp32"]


def tokens_per_s(sequence: int, seq_len: int, steps: int) -> float:
    run = train(MODEL + [f"data.seq_len={seq_len}", "train.micro_batch_size=2", "train.global_batch_size=4",
                         f"train.max_steps={steps}", f"parallel.sequence={sequence}"])
    return run.median("perf/tokens_per_s", after=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--train-seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    for masking in (False, True):
        whole, split = (split_activations(DEMO, MODEL, ranks, masking, args.seq_len) for ranks in (1, 2))
        print(f"activations kept for backward at seq {args.seq_len}, document masking {masking}: sequence split "
              f"over 2 ranks / whole {split['measured'] / whole['measured']:.3f} "
              f"({split['measured'] / 2**20:.0f} vs {whole['measured'] / 2**20:.0f} MiB per rank); measured / "
              f"plan's estimate {whole['measured'] / whole['estimated']:.3f} whole, "
              f"{split['measured'] / split['estimated']:.3f} split")
    prepare()
    # the same samples per optimizer step: 2 data-parallel ranks x 2 micro-batches, or 1 sequence group x 2 x 2
    data_parallel, split = (tokens_per_s(s, args.train_seq_len, args.steps) for s in (1, 2))
    print(f"tokens/s at seq {args.train_seq_len} on 2 ranks: sequence split / data parallel "
          f"{split / data_parallel:.2f} ({split:.0f} vs {data_parallel:.0f})")


if __name__ == "__main__":
    main()
