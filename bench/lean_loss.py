"""Peak memory of the causal-LM loss at a Llama-3-size vocabulary: the model's output layer and the loss over
one micro-batch, forward and backward, whole (today's fp32 copy of the logits and its log-softmax) against
chunked (train.loss_chunk_tokens: trainer/tasks/causal_lm.py token_losses), each in a fresh process: its peak resident
memory less what it held before (hidden states and the output layer's weight).

    .venv/bin/python bench/lean_loss.py [--vocab 128256] [--tokens 2048] [--hidden 512] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 2**20


def peak_of_loss(vocab: int, tokens: int, hidden: int, precision: str, chunk: int | None) -> dict:
    """In this process: the bytes the loss adds at its peak, and the loss and a gradient checksum."""
    import torch

    from trainer.tasks.causal_lm import token_losses

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(dtype).requires_grad_()
    states = torch.randn(1, tokens, hidden, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = token_losses(torch.nn.functional.linear(states, weight), labels, chunk).mean()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"added": peak - before, "loss": loss.item(), "grad": states.grad.float().norm().item()}


def measured(args, chunk: int | None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(chunk), "--vocab", str(args.vocab),
                          "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--precision", args.precision],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(peak_of_loss(args.vocab, args.tokens, args.hidden, args.precision, json.loads(args.child))))
        return
    from trainer.tasks.causal_lm import loss_chunk

    chunk = loss_chunk(args.tokens, args.vocab, None)
    whole, chunked = measured(args, None), measured(args, chunk)
    print(f"loss of {args.tokens} tokens at vocab {args.vocab:,} ({args.precision} logits of "
          f"{args.tokens * args.vocab * (2 if args.precision == 'bf16' else 4) / MiB:,.0f} MiB): peak memory added, "
          f"chunked ({chunk} tokens) / whole {chunked['added'] / whole['added']:.3f} "
          f"({chunked['added'] / MiB:,.0f} vs {whole['added'] / MiB:,.0f} MiB); loss {chunked['loss']:.6f} vs "
          f"{whole['loss']:.6f}, gradient norm {chunked['grad']:.6f} vs {whole['grad']:.6f}")


if __name__ == "__main__":
    main()
