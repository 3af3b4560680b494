"""Ulysses sequence parallelism on CPU ranks (parallel.sequence, trainer/sequence_parallel.py).

1. Activation memory per rank at a long sequence: the bytes autograd keeps for backward in one forward + loss
   of a small Llama, sequence split over 2 gloo ranks vs one rank holding it whole; each also against the
   memory model `zerotrain plan` uses (trainer/memory.py), with and without document masking.
2. Throughput: tokens/s of the real CLI training the demo data with the sequence split over 2 ranks vs 2
   data-parallel ranks at the same seq_len (medians of the logged perf/tokens_per_s after the first steps).

    .venv/bin/python bench/sequence_parallel.py [--seq-len 8192] [--train-seq-len 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config  # noqa: E402
from trainer.memory import activation_bytes, architecture, document_mask_bytes  # noqa: E402
from trainer.model import lm_loss, model_config  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
VOCAB, EOS = 8192, 0
MODEL = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
         "model.config.max_position_embeddings=16384", "train.precision=fp32"]


def kept_for_backward(cfg, shard, batch: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward + loss (parameters excluded)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(cfg.model, VOCAB))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keep_logits(module, args, output):  # alive until the loss is computed, as the plan counts them
        pack(output.logits)

    model.register_forward_hook(keep_logits)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model, batch, EOS if cfg.data.document_masking else None, shard)
    return sum(kept.values())


def memory_rank(rank: int, size: int, port: int, overrides: list[str], seq_len: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from trainer import sequence_parallel
    deepspeed.init_distributed("gloo", verbose=False)
    cfg = load_config(DEMO, MODEL + overrides + [f"data.seq_len={seq_len}", "train.micro_batch_size=1",
                                                 f"train.global_batch_size={size}", f"launch.nproc_per_node={size}",
                                                 f"parallel.sequence={size}"])
    shard = sequence_parallel.setup(model_config(cfg.model, VOCAB), size, 1, seq_len, cfg.data.document_masking)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(1, VOCAB, (1, seq_len + 1), generator=generator)
    batch[torch.rand(batch.shape, generator=generator) < 1 / 200] = EOS  # documents of ~200 tokens
    measured = kept_for_backward(cfg, shard, batch)
    arch = dataclasses.replace(architecture(cfg, VOCAB), attention="sdpa")
    estimated = activation_bytes(arch, "fp32", 1, seq_len // size) + document_mask_bytes(cfg, arch)
    if rank == 0:
        Path(out).write_text(json.dumps({"measured": measured, "estimated": estimated}))


def memory(sequence: int, masking: bool, seq_len: int) -> dict:
    with socket.socket() as s, tempfile.NamedTemporaryFile(suffix=".json") as out:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(memory_rank, args=(sequence, port, [f"data.document_masking={str(masking).lower()}"], seq_len,
                                    out.name), nprocs=sequence)
        return json.loads(Path(out.name).read_text())


def tokens_per_s(sequence: int, seq_len: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sets = MODEL + [f"run.output_dir={tmp}/run", f"data.seq_len={seq_len}", "train.micro_batch_size=2",
                        "train.global_batch_size=4", f"train.max_steps={steps}", "train.log_every=1",
                        "optim.warmup_steps=1", "eval.every=0", "checkpoint.every=0", f"parallel.sequence={sequence}"]
        subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(DEMO), "--nproc", "2",
                        *[a for s in sets for a in ("--set", s)]], cwd=REPO, check=True, capture_output=True)
        records = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--train-seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    for masking in (False, True):
        whole, split = memory(1, masking, args.seq_len), memory(2, masking, args.seq_len)
        print(f"activations kept for backward at seq {args.seq_len}, document masking {masking}: sequence split "
              f"over 2 ranks / whole {split['measured'] / whole['measured']:.3f} "
              f"({split['measured'] / 2**20:.0f} vs {whole['measured'] / 2**20:.0f} MiB per rank); measured / "
              f"plan's estimate {whole['measured'] / whole['estimated']:.3f} whole, "
              f"{split['measured'] / split['estimated']:.3f} split")
    subprocess.run([sys.executable, "-m", "launcher.cli", "prepare", str(DEMO)], cwd=REPO, check=True,
                   capture_output=True)
    # the same samples per optimizer step: 2 data-parallel ranks x 2 micro-batches, or 1 sequence group x 2 x 2
    data_parallel, split = (tokens_per_s(s, args.train_seq_len, args.steps) for s in (1, 2))
    print(f"tokens/s at seq {args.train_seq_len} on 2 ranks: sequence split / data parallel "
          f"{split / data_parallel:.2f} ({split:.0f} vs {data_parallel:.0f})")


if __name__ == "__main__":
    main()
