"""Translate the run config into DeepSpeed's JSON config."""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config
from trainer.engine.autoep import expert_parallel_config

# Bucket sizes track the model: DeepSpeed's 5e8-element defaults cost ~1 GB extra on a small model.
MIN_BUCKET, MAX_BUCKET = 1_000_000, 500_000_000


def bucket_size(parameters: int) -> int:
    bucket = max(MIN_BUCKET, min(MAX_BUCKET, parameters))
    return bucket + bucket % 2  # ZeRO 1-2 assert a multiple of 2 (NCCL's 4-byte start alignment of 16-bit elements)


def deepspeed_config(cfg: Config, num_parameters: int, load_universal: bool = False,
                     largest_parameter: int | None = None, trainable: int | None = None,
                     model_type: str | None = None) -> dict:
    """`load_universal`: the run resumes from a universal checkpoint (saved by another number of ranks).
    `largest_parameter`: the numel of the model's largest parameter; sizes the NVMe parameter swap buffers
    (without it they are sized for the whole model: always enough, but more memory). `trainable`: the parameters
    that get gradients (all by default; model.lora's adapters): the gradient buckets follow them. `model_type`:
    the transformers model type, which parallel.expert needs."""
    t, o, z = cfg.train, cfg.optim, cfg.zero
    bucket, gradients = bucket_size(num_parameters), bucket_size(trainable or num_parameters)
    zero = {
        "stage": z.stage,
        "reduce_bucket_size": gradients,
        "allgather_bucket_size": gradients,  # stages 1-2 gather the updated (trainable) parameters
        "overlap_comm": z.stage >= 2,
        # Under expert parallelism ZeRO 1 needs it too (measured: without, the experts' gradients come out wrong -
        # a step-1 gradient norm of 0.8325 instead of 0.8273 - with DeepSpeed's AutoEP)
        "contiguous_gradients": z.stage >= 2 or cfg.parallel.expert > 1,
    }
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer}
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param}
    if z.stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_param_persistence_threshold"] = min(bucket, 100_000)
    aio = None
    if z.offload_optimizer == "nvme" or z.offload_param == "nvme":
        aio = _nvme(cfg, zero, largest_parameter or num_parameters)
    return {
        "train_batch_size": cfg.layout.deepspeed_batch(t.global_batch_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        # fp32 under bf16: DeepSpeed sums the micro-batches' gradients into fp32 partitions (stages 2-3) or,
        # at stage 1, swaps its ZeRO optimizer for its BF16_Optimizer, which keeps fp32 gradients
        "data_types": {"grad_accum_dtype": cfg.grad_accum_dtype},
        "fp16": {"enabled": t.precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no C++ op to compile, and DeepSpeed allows it with optimizer offload.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "torch_adam": True},
        },
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # zerotrain logs its own metrics
        "wall_clock_breakdown": False,
    } | ({"aio": aio} if aio else {}) | (
        {"tensor_parallel": {"autotp_size": cfg.parallel.tensor}} if cfg.parallel.tensor > 1 else {}) | (
        {"expert_parallel": expert_parallel_config(model_type, cfg.parallel.expert)} if cfg.parallel.expert > 1 else {})


# DeepSpeed swaps a tensor to NVMe only if it has at least this many bytes (swap_tensor.utils.MIN_AIO_BYTES);
# smaller ones stay in memory. Also the aio block size.
AIO_BLOCK = 1024**2
PARAM_SWAP_BUFFERS = 5  # DeepSpeed's default: more than the parameters one module (a Linear: 1 or 2) needs at once


def nvme_folder(cfg: Config) -> Path:
    """Where this run's swap files go: a folder per run name, so that runs sharing zero.nvme_path do not
    delete each other's files (DeepSpeed empties its rank folders at start). Under it DeepSpeed writes
    zero_stage_3/optimizer/rank{R}/ and zero_stage_3/{dtype}params/rank{R}/, and leaves them at exit."""
    return cfg.zero.nvme_path / cfg.run.name


def _nvme(cfg: Config, zero: dict, largest_parameter: int) -> dict:
    """Fill in the NVMe offload settings; returns the `aio` section (libaio requests)."""
    z, folder = cfg.zero, str(nvme_folder(cfg))
    if z.offload_optimizer == "nvme":
        # 4 buffers: the fp32 master, gradient and both Adam moments of one partition in flight (the default).
        zero["offload_optimizer"].update(nvme_path=folder, buffer_count=4)
    if z.offload_param == "nvme":
        zero["offload_param"].update(
            nvme_path=folder,
            buffer_count=PARAM_SWAP_BUFFERS,
            # A buffer holds one parameter's partition on this rank: DeepSpeed fails ("More elements N than
            # buffer size") on a partition larger than buffer_size; its 1e8 default costs 5 x 1e8 elements.
            buffer_size=-(-largest_parameter // cfg.world_size),
            # Parameters kept in memory instead of on NVMe: none (DeepSpeed's 1e9 default would keep every
            # parameter of a model under 1e9 in memory and write nothing to NVMe).
            max_in_cpu=0,
        )
        # Swap buffers are few: a parameter must give its buffer back right after its module ran, or DeepSpeed
        # fails with "AssertionError: Not enough buffers 0 for swapping 1". Its default keeps parameters that
        # are used again soon (in backward) gathered: every buffer is held after the first step. And prefetching
        # follows the training trace (forward, then backward): after a forward-only pass (validation) the
        # parameters it fetched for a backward that never comes keep their buffers and the next pass fails.
        # Without prefetch, NVMe reads do not overlap compute: slower, but it runs.
        zero["stage3_max_reuse_distance"] = 0
        zero["stage3_prefetch_bucket_size"] = 0
    return {
        "block_size": AIO_BLOCK,
        "queue_depth": 8,
        "intra_op_parallelism": 1,  # I/O threads per request: on a CPU run they compete with training
        "single_submit": False,
        "overlap_events": True,
        "use_gds": False,
    }


def zero_config(ds_config: dict):
    """DeepSpeed's parsed `zero_optimization` section of `ds_config` (its defaults filled in)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**ds_config["zero_optimization"])


def allreduce_buffer_elements() -> int:
    """The elements of the flattened buffers the stage-0 engine all-reduces gradients in."""
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE

    return MEMORY_OPT_ALLREDUCE_SIZE
