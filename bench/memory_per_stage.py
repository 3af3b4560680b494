"""Memory per rank of zerotrain's DeepSpeed engine at ZeRO stages 0-3 (bf16, 2 ranks, a ~34M Llama), measured.

1. Model states against the ZeRO paper's mixed-precision Adam accounting: per parameter 2 B bf16 weights +
   2 B gradients + 12 B optimizer states (fp32 master + two moments), partitioned over N ranks as
   stage 0: 16, stage 1: 2 + 2 + 12/N, stage 2: 2 + (2 + 12)/N, stage 3: 16/N. Measured like
   tests/launcher/test_plan.py: the bytes of the distinct tensor storages that appeared since before the model was
   built (every tensor reachable from Python, with its .grad), in the second training step (the first made
   the Adam moments) - after backward (weights, gradients and optimizer states all live: the moment the
   paper's formula describes), and the most at any of after backward / the optimizer step / after it
   (DeepSpeed's fp32 gradient copies for the step and its buckets included).
2. Peak RSS (ru_maxrss) of each rank over start-up and `--steps` steps with the bucket sizes zerotrain
   derives from the parameter count (trainer/engine/deepspeed_config.py) against DeepSpeed's own defaults
   (reduce/allgather buckets 5e8 elements, stage-3 prefetch 5e7: the keys left out), fresh processes each;
   and, measured as in 1 in one more step (plus a point inside backward, when it reaches the first decoder
   layer: DeepSpeed's stage-1/2 gradient buckets live only during backward), the most tensor bytes allocated -
   what a GPU's caching allocator must hold, where RSS counts only the pages touched.

Random tokens (no data needed). Each part starts real gloo process groups of `--ranks` processes. The model is
built whole on every rank, as tests/launcher/test_plan.py does (zerotrain may build a stage-3 model inside
deepspeed.zero.Init: less memory at start-up, the same states after a step).

    .venv/bin/python bench/memory_per_stage.py [--hidden 512] [--layers 8] [--rss-stages 1 2 3] [--steps 2]
"""

import argparse
import gc
import os
import resource
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # live_tensors, ranks: measured as tests/launcher/test_plan.py does
from live_tensors import NewStorages  # noqa: E402
from ranks import join, spawn, write_result  # noqa: E402
DEMO = REPO / "configs" / "demo.yaml"
VOCAB = 8192
MiB = 2**20
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold")


def paper_bytes_per_param(stage: int, world: int) -> float:
    """The ZeRO paper's model states per parameter (bf16 weights and gradients, fp32 Adam) on one rank."""
    return {0: 16, 1: 2 + 2 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage]


def run_config(args, stage: int):
    from trainer.config import load_config

    h = args.hidden
    sets = [f"model.config.hidden_size={h}", f"model.config.intermediate_size={h * 8 // 3}",
            f"model.config.num_hidden_layers={args.layers}", f"model.config.num_attention_heads={h // 64}",
            f"model.config.num_key_value_heads={h // 64}", f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch * args.ranks}",
            "train.precision=bf16", f"zero.stage={stage}", f"launch.nproc_per_node={args.ranks}"]
    return load_config(DEMO, sets)


# ---------------------------------------------------------------------------------------------------------------
# one rank


def engine_for(cfg, default_buckets: bool = False):
    """zerotrain's engine for `cfg` (its model seed, parameter groups and DeepSpeed config); optionally with
    the bucket keys left out, so DeepSpeed's defaults apply."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.engine.deepspeed_config import deepspeed_config
    from trainer.optim import param_groups

    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.model.type, **cfg.model.config,
                                                                  vocab_size=VOCAB))
    n_params = sum(p.numel() for p in model.parameters())
    ds = deepspeed_config(cfg, n_params)
    if default_buckets:
        for key in BUCKET_KEYS:
            ds["zero_optimization"].pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                      config=ds)
    return engine, n_params


def random_batch(cfg) -> torch.Tensor:
    return torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))


def measured_step(engine, cfg, storages: NewStorages, in_backward: bool = False) -> tuple[int, int]:
    """One training step: new storage bytes after backward, and the most at after backward / the optimizer
    step (a pre-hook on the torch AdamW DeepSpeed steps) / after the step; with `in_backward` also when backward
    reaches the first decoder layer (gradient buckets live, but so do that layer's activations)."""
    from trainer.tasks.causal_lm import lm_loss

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen = []
    hooks = [inner.register_step_pre_hook(lambda *_: seen.append(storages.bytes()))]
    if in_backward:
        def on_output(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: seen.append(storages.bytes()))

        hooks.append(engine.module.model.layers[0].register_forward_hook(on_output))
    engine.backward(lm_loss(engine, random_batch(cfg)))
    after_backward = storages.bytes()
    engine.step()
    for hook in hooks:
        hook.remove()
    return after_backward, max(seen + [after_backward, storages.bytes()])


def model_state_bytes(cfg) -> dict:
    """New storage bytes in the second step (the first made the Adam moments)."""
    from trainer.tasks.causal_lm import lm_loss

    storages = NewStorages()
    engine, n_params = engine_for(cfg)
    engine.backward(lm_loss(engine, random_batch(cfg)))
    engine.step()
    after_backward, peak = measured_step(engine, cfg, storages)
    del engine
    gc.collect()
    return {"params": n_params, "after_backward": after_backward, "peak": peak}


def states_rank(rank: int, world: int, port: int, args, out: str) -> None:
    join(rank, world, port)
    import torch.distributed as dist

    results = {stage: model_state_bytes(run_config(args, stage)) for stage in (0, 1, 2, 3)}
    write_result(out, rank, results)
    dist.barrier()
    dist.destroy_process_group()


def rss_rank(rank: int, world: int, port: int, args, stage: int, default_buckets: bool, out: str) -> None:
    """Peak RSS over start-up and `args.steps` steps; then one more step measured for the most bytes of tensors
    allocated, backward included (what a GPU's allocator would have to hold; on CPU the untouched pages of a
    buffer cost no RSS)."""
    join(rank, world, port)
    import torch.distributed as dist

    from trainer.tasks.causal_lm import lm_loss

    cfg = run_config(args, stage)
    storages = NewStorages()
    engine, _ = engine_for(cfg, default_buckets)
    for _ in range(args.steps):
        engine.backward(lm_loss(engine, random_batch(cfg)))
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    _, allocated = measured_step(engine, cfg, storages, in_backward=True)
    write_result(out, rank, {"peak_rss": peak, "allocated": allocated})
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# the parent


def report_states(args) -> None:
    per_rank = spawn(states_rank, args.ranks, args)
    params = per_rank[0]["0"]["params"]
    print(f"model states per rank, bf16, {args.ranks} ranks, {params / 1e6:.1f}M parameters "
          "(measured / ZeRO paper formula; ranks' figures differ by their partitions' padding):")
    for stage in range(4):
        formula = paper_bytes_per_param(stage, args.ranks) * params
        after = [r[str(stage)]["after_backward"] for r in per_rank]
        peak = [r[str(stage)]["peak"] for r in per_rank]
        print(f"  ZeRO-{stage}: formula {formula / MiB:7.1f} MiB ({paper_bytes_per_param(stage, args.ranks):.1f} B/param)"
              f" | after backward {' / '.join(f'{b / MiB:.1f}' for b in after)} MiB = "
              f"{' / '.join(f'{b / formula:.3f}' for b in after)}"
              f" | peak in step {' / '.join(f'{b / MiB:.1f}' for b in peak)} MiB = "
              f"{' / '.join(f'{b / formula:.3f}' for b in peak)}", flush=True)


def report_rss(args) -> None:
    print(f"per rank, DeepSpeed's default buckets vs zerotrain's (sized from the parameter count): peak RSS over "
          f"start-up and {args.steps} steps, and the most tensor bytes allocated in a step (activations included):")
    for stage in args.rss_stages:
        tuned = spawn(rss_rank, args.ranks, args, stage, False)
        default = spawn(rss_rank, args.ranks, args, stage, True)
        for key, name in (("peak_rss", "peak RSS"), ("allocated", "tensors")):
            ours, theirs = [r[key] for r in tuned], [r[key] for r in default]
            print(f"  ZeRO-{stage} {name:>8}: zerotrain {' / '.join(f'{b / MiB:,.0f}' for b in ours)} MiB, "
                  f"DeepSpeed defaults {' / '.join(f'{b / MiB:,.0f}' for b in theirs)} MiB: default / zerotrain = "
                  f"{max(theirs) / max(ours):.2f} ({(max(theirs) - max(ours)) / MiB:+,.0f} MiB on the larger rank)",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps of each peak-RSS run")
    parser.add_argument("--rss-stages", type=int, nargs="*", default=[2, 3], choices=[1, 2, 3],
                        help="stages of the bucket comparison (zerotrain's stage 1 has no contiguous gradient buckets)")
    parser.add_argument("--skip-states", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not args.skip_states:
        report_states(args)
    report_rss(args)


if __name__ == "__main__":
    main()
