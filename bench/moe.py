"""Mixture-of-experts pretraining on 2 CPU ranks: a Mixtral of 8 experts (top-2; hidden 256, 4 layers, 17.8M
parameters, 8.4M active per token) on the demo's Shakespeare, bf16.

1. tokens/s of the real CLI per ZeRO stage, and with expert parallelism (parallel.expert 2: each rank holds 4 of
   every layer's 8 experts, tokens exchanged all-to-all) against the same stage without; medians of the logged
   perf/tokens_per_s after start-up.
2. ZeRO-3 leaf modules: DeepSpeed's `set_z3_leaf_modules` on the MoE blocks (what LLaMA-Factory and others do
   against ZeRO-3 hangs with per-expert modules) against none, in a DeepSpeed loop built of zerotrain's parts
   (its DeepSpeed config, optimizer groups, loss and router loss) - zerotrain itself sets none: transformers 5
   keeps a layer's experts in one module that every rank calls.

    .venv/bin/python bench/moe.py [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from demo_runs import DEMO, REPO, prepare, train

MOE = ["model.type=mixtral", "model.config.hidden_size=256", "model.config.intermediate_size=512",
       "model.config.num_hidden_layers=4", "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
       "model.config.num_local_experts=8", "model.config.router_aux_loss_coef=0.02", "data.seq_len=256",
       "train.micro_batch_size=4", "train.global_batch_size=16", "train.precision=bf16"]


def cli_tokens_per_s(stage: int, expert: int, steps: int) -> float:
    run = train(MOE + [f"zero.stage={stage}", f"parallel.expert={expert}", f"train.max_steps={steps}"])
    return run.median("perf/tokens_per_s", after=2)


def leaf_rank(leaf: bool, steps: int) -> None:
    """One rank of the leaf-module comparison (run under torchrun): ZeRO 3, the same batches as the CLI's
    shapes, tokens/s over the steps after the first two."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.engine.deepspeed_config import deepspeed_config
    from trainer.model.build import model_config
    from trainer.model.moe import Router, routing
    from trainer.optim import param_groups
    from trainer.tasks.causal_lm import lm_loss

    cfg = load_config(DEMO, MOE + ["zero.stage=3"])
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    config = model_config(cfg.model, 8192)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if leaf:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                      config=deepspeed_config(cfg, sum(p.numel() for p in model.parameters())))
    router = Router(engine.module, routing(config), engine.device)
    rng = torch.Generator().manual_seed(int(os.environ["RANK"]))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = torch.randint(0, 8192, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=rng)
            engine.backward(lm_loss(engine, batch) + router.penalty())
            engine.step()
        times.append(time.perf_counter() - start)
    if os.environ["RANK"] == "0":
        step = sorted(times[2:])[len(times[2:]) // 2]
        print(f"RESULT {cfg.train.global_batch_size * cfg.data.seq_len / step:.1f}", flush=True)


def leaf_tokens_per_s(leaf: bool, steps: int) -> float:
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                          "--leaf-rank", str(int(leaf)), "--steps", str(steps)], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return float(next(line for line in out.stdout.splitlines() if line.startswith("RESULT")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--leaf-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.leaf_rank is not None:
        leaf_rank(bool(args.leaf_rank), args.steps)
        return
    prepare()
    rates = {(stage, 1): cli_tokens_per_s(stage, 1, args.steps) for stage in (0, 1, 2, 3)}
    rates |= {(stage, 2): cli_tokens_per_s(stage, 2, args.steps) for stage in (1, 3)}
    base = rates[(2, 1)]
    for (stage, expert), rate in rates.items():
        print(f"ZeRO {stage}, parallel.expert {expert}: {rate:.0f} tokens/s = {rate / base:.2f}x ZeRO 2"
              + (f", {rate / rates[(stage, 1)]:.2f}x without expert parallelism" if expert > 1 else ""))
    plain, leaf = (leaf_tokens_per_s(flag, args.steps) for flag in (False, True))
    print(f"ZeRO 3 DeepSpeed loop: leaf modules / none {leaf / plain:.2f} ({leaf:.0f} vs {plain:.0f} tokens/s)")


if __name__ == "__main__":
    main()
