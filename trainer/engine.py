"""The DeepSpeed engine of one rank: the model built for the run (partitioned from the start at ZeRO stage 3),
its optimizer groups and learning-rate schedule, under the DeepSpeed config zerotrain writes."""

from __future__ import annotations

import logging

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers.integrations import HfDeepSpeedConfig

from trainer.config import Config
from trainer.data import TrainingData
from trainer.deepspeed_config import deepspeed_config
from trainer.initialization import initialise
from trainer.model import Architecture, architecture, build_model
from trainer.optim import param_groups, warmup_cosine

log = logging.getLogger("zerotrain")


def build_engine(cfg: Config, data: TrainingData, load_universal: bool) -> tuple[object, Architecture]:
    """The engine, and the model's architecture. The shape comes from a build on the meta device first: bucket
    sizes follow its parameter count, and at stage 3 it is then built partitioned (`deepspeed.zero.Init`,
    unless zero.partitioned_init is off): no rank ever holds all of it. `load_universal`: the run resumes from
    a universal checkpoint (saved by another number of ranks)."""
    config = data.model_config(cfg.model)
    arch = architecture(cfg.model, config)
    ds_config = deepspeed_config(cfg, arch.held(cfg.parallel.tensor), load_universal,
                                 largest_parameter=max(arch.sizes))
    log.info(f"model: {config.model_type} ({cfg.model.task}), {arch.params / 1e6:.2f}M parameters, ZeRO stage "
             f"{cfg.zero.stage}, {cfg.train.precision}, grad accumulation {cfg.grad_accum}")
    torch.manual_seed(cfg.run.seed)  # the same dropout and other draws on every rank
    # While this object lives, transformers builds (and loads) models inside deepspeed.zero.Init.
    zero_init = HfDeepSpeedConfig(ds_config) if cfg.zero.stage == 3 and cfg.zero.partitioned_init else None
    model = build_model(cfg.model, config)
    if cfg.model.init_from is None:  # the same weights at every stage, partitioned or not, on any number of ranks
        initialise(model, cfg.run.seed, partitioned=zero_init is not None)
    if zero_init:
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        log.info(f"model built partitioned (deepspeed.zero.Init): this rank holds {held / 1e6:.2f}M of "
                 f"{arch.params / 1e6:.2f}M parameters")
    o = cfg.optim
    factor = warmup_cosine(o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, o.weight_decay),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, factor),
        config=ds_config,
    )
    del zero_init
    if cfg.train.compile:  # compiled lazily, at the first forward and backward
        engine.compile()  # DeepSpeed's: torch.compile of the module, its ZeRO hooks kept around it
    return engine, arch
