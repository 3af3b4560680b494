"""Translate the run config into DeepSpeed's JSON config."""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainer.config import Config, ConfigError

# Bucket sizes track the model: DeepSpeed's 5e8-element defaults cost ~1 GB extra on a small model.
MIN_BUCKET, MAX_BUCKET = 1_000_000, 500_000_000


def deepspeed_config(cfg: Config, num_parameters: int, load_universal: bool = False,
                     largest_parameter: int | None = None) -> dict:
    """`load_universal`: the run resumes from a universal checkpoint (saved by another number of ranks).
    `largest_parameter`: the numel of the model's largest parameter; sizes the NVMe parameter swap buffers
    (without it they are sized for the whole model: always enough, but more memory)."""
    t, o, z = cfg.train, cfg.optim, cfg.zero
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
    aio = None
    if z.offload_optimizer == "nvme" or z.offload_param == "nvme":
        aio = _nvme(cfg, zero, largest_parameter or num_parameters)
    return {
        # DeepSpeed sees every rank as data-parallel (trainer/sequence_parallel.py): a sequence group's slices
        # of a sample count as samples to it. Under AutoTP its batch check counts every rank too (measured),
        # though it averages gradients over the data-parallel ranks only.
        "train_batch_size": t.global_batch_size * cfg.parallel.model_parallel,
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
        {"tensor_parallel": {"autotp_size": cfg.parallel.tensor}} if cfg.parallel.tensor > 1 else {})


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


def check_nvme_offload(cfg: Config) -> None:
    """Pre-flight for NVMe offload, before any rank starts: zero.nvme_path is a writable folder (created if
    missing) and DeepSpeed's async_io op can be built (it needs libaio) - built now if it is not yet, so that
    the ranks load it from the cache instead of compiling it on the clock. Raises ConfigError with one line."""
    z = cfg.zero
    keys = [f"zero.{k}" for k in ("offload_optimizer", "offload_param") if getattr(z, k) == "nvme"]
    if not keys:
        return
    folder = nvme_folder(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"zero.nvme_path: cannot write swap files in {folder} ({e.strerror or e})") from None
    if not async_io_available():
        raise ConfigError(f"{keys[0]}: nvme offload needs DeepSpeed's async_io op, which needs libaio and it is "
                          "not installed here (Debian/Ubuntu: apt-get install libaio-dev; elsewhere set CFLAGS/"
                          "LDFLAGS to its headers and library); use cpu offload instead")
    try:
        build_async_io()
    except Exception as e:  # a compiler error: its output went to stderr above
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{keys[0]}: DeepSpeed's async_io op, which nvme offload needs, did not build ({first})") \
            from None


def async_io_available() -> bool:
    """Whether DeepSpeed's async_io op can be built or loaded here: libaio's headers and library are found."""
    import contextlib
    import io

    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # its compiler probe prints
        return bool(AsyncIOBuilder().is_compatible(verbose=False))


def build_async_io() -> None:
    """Load the op, JIT-compiling it first if needed: once per machine (cached in ~/.cache/torch_extensions, or
    TORCH_EXTENSIONS_DIR): 7.5 CPU-minutes of gcc measured, with DeepSpeed's pin_memory op it loads first."""
    import contextlib
    import io
    import sys

    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from torch.utils.cpp_extension import _get_build_directory

    if not installed_ops.get("async_io") and \
            not (Path(_get_build_directory("async_io", verbose=False)) / "async_io.so").exists():
        print("zerotrain: compiling DeepSpeed's async_io op for nvme offload, once on this machine (minutes)",
              file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        AsyncIOBuilder().load(verbose=False)
