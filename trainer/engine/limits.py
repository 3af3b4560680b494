"""What DeepSpeed can and cannot do with a config, checked before anything starts, and the defaults that follow
from it. Each rule was measured on the DeepSpeed version the engine names (trainer/engine/__init__.py)."""

from __future__ import annotations

from trainer.config import Config, ConfigError, TrainSection
from trainer.engine import DEEPSPEED


def accumulation_dtype(train: TrainSection, stage: int) -> str:
    """train.grad_accum_dtype, or its default at ZeRO `stage`: fp32 under bf16 where DeepSpeed can (stages 1-3),
    else the training precision."""
    if train.grad_accum_dtype is not None:
        return train.grad_accum_dtype
    return "fp32" if train.precision == "bf16" and stage > 0 else train.precision


def check_limits(cfg: Config, cuda_available: bool | None) -> None:
    """One-line ConfigErrors for what DeepSpeed cannot run. `cuda_available=None`: the device is not known yet."""
    _check_parallel(cfg)
    _check_offload(cfg, cuda_available)
    _check_grad_accum(cfg)
    if cuda_available is False and cfg.train.precision == "fp16":
        raise ConfigError("train.precision: fp16 needs a CUDA GPU and none is visible; use bf16 or fp32")


def _check_parallel(cfg: Config) -> None:
    p = cfg.parallel
    if p.sequence > 1 and p.tensor > 1:  # AutoTP's mesh is 2-D: data x tensor
        raise ConfigError("parallel.tensor: does not compose with parallel.sequence (DeepSpeed's tensor-parallel "
                          "mesh is data x tensor only); choose one of them")
    if p.tensor > 1 and cfg.model.lora is not None:  # measured: a KeyError in its ZeRO optimizer's parameter map
        raise ConfigError(f"parallel.tensor: DeepSpeed {DEEPSPEED}'s AutoTP does not compose with LoRA adapters (it "
                          "replaces the linear layers PEFT wrapped, and its ZeRO optimizer no longer finds their "
                          "parameters); train LoRA data-parallel, ZeRO 3 partitioning the frozen base")
    if p.expert > 1 and p.sequence * p.tensor > 1:  # untested: AutoEP builds its own groups, ignorant of these
        raise ConfigError("parallel.expert: does not compose with parallel.sequence or parallel.tensor here; "
                          "choose one of them")
    if p.expert > 1 and cfg.model.lora is not None:  # AutoEP replaces the MoE blocks PEFT would have wrapped
        raise ConfigError("parallel.expert: LoRA adapters are trained without expert parallelism (AutoEP replaces "
                          "the layers PEFT wraps); set parallel.expert: 1")
    if p.tensor > 1 and cfg.zero.stage == 3 and cfg.world_size % p.tensor == 0:
        # measured: its batch-size check counts the world one way, then the other
        raise ConfigError(f"parallel.tensor: DeepSpeed {DEEPSPEED} cannot initialise tensor parallelism at "
                          "zero.stage 3 (its train_batch_size check contradicts itself); use zero.stage 0, 1 or 2")


def _check_offload(cfg: Config, cuda_available: bool | None) -> None:
    z, t = cfg.zero, cfg.train
    if z.offload_param != "none" and z.stage != 3:
        raise ConfigError(f"zero.offload_param: parameter offload needs zero.stage 3 (got stage {z.stage})")
    if z.offload_optimizer != "none" and z.stage == 0:
        raise ConfigError("zero.offload_optimizer: optimizer offload needs zero.stage 1, 2 or 3 (got stage 0)")
    if z.offload_optimizer == "nvme" and z.stage != 3:  # DeepSpeed would silently offload to cpu memory instead
        raise ConfigError(f"zero.offload_optimizer: nvme offload needs zero.stage 3 (got stage {z.stage}); "
                          "use cpu at stages 1-2")
    if "nvme" in (z.offload_optimizer, z.offload_param) and z.nvme_path is None:
        raise ConfigError("zero.nvme_path: required with nvme offload; give a folder on a fast local disk")
    if z.offload_param == "nvme" and t.precision == "fp32" and not z.partitioned_init and cuda_available is False:
        raise ConfigError("zero.partitioned_init: fp32 parameter offload to nvme on CPU needs zero.partitioned_init "
                          "true (DeepSpeed makes the swap buffers bf16 otherwise)")


def _check_grad_accum(cfg: Config) -> None:
    t = cfg.train
    if t.grad_accum_dtype in (None, t.precision):
        return
    if t.grad_accum_dtype != "fp32":
        raise ConfigError(f"train.grad_accum_dtype: {t.grad_accum_dtype} under {t.precision} training; gradients "
                          "accumulate in fp32 or in the training precision")
    if t.precision == "fp16":
        raise ConfigError("train.grad_accum_dtype: fp32 accumulation is supported under bf16 here (fp16 runs keep "
                          "DeepSpeed's fp16 accumulation with its loss scaling); set it to fp16 or leave it out")
    if cfg.zero.stage == 0:  # DeepSpeed: NotImplementedError("unsupported mix of model_dtype=... grad_accum_dtype")
        raise ConfigError(f"train.grad_accum_dtype: DeepSpeed {DEEPSPEED} accumulates bf16 gradients in fp32 only "
                          "under ZeRO (zero.stage 1-3); at stage 0 leave it out (bf16) or use zero.stage 1")
