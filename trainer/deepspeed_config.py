"""Translate the run config into DeepSpeed's JSON config."""

from __future__ import annotations

from trainer.config import Config

# Bucket sizes track the model: DeepSpeed's 5e8-element defaults cost ~1 GB extra on a small model.
MIN_BUCKET, MAX_BUCKET = 1_000_000, 500_000_000


def deepspeed_config(cfg: Config, num_parameters: int, load_universal: bool = False) -> dict:
    """`load_universal`: the run resumes from a universal checkpoint (saved by another number of ranks)."""
    t, z = cfg.train, cfg.zero
    bucket = max(MIN_BUCKET, min(MAX_BUCKET, num_parameters))
    zero = {
        "stage": z.stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "overlap_comm": z.stage >= 2,
        "contiguous_gradients": z.stage >= 2,
    }
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer}
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param}
    if z.stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_param_persistence_threshold"] = min(bucket, 100_000)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no C++ op to compile, and DeepSpeed allows it with optimizer offload.
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "torch_adam": True},
        },
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # zerotrain logs its own metrics
        "wall_clock_breakdown": False,
    }
