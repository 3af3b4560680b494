"""DeepSpeed as the engine: the model built for the run (partitioned from the start at ZeRO stage 3), its optimizer
groups and learning-rate schedule under the DeepSpeed config zerotrain writes, and `DeepSpeedEngine`, the
`Engine` the loop drives.

A resumed engine takes from a checkpoint what the run learned - weights, Adam moments and step counts - and
from the config what the run is told: the optimizer's hyper-parameters (lr, betas, weight decay) and the
learning-rate schedule, evaluated at the checkpoint's step. So a resume that changes optim.* or train.max_steps
trains on exactly the schedule its config describes.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PretrainedConfig
from transformers.integrations import HfDeepSpeedConfig

from trainer.config import Config
from trainer.engine import Engine, repairs
from trainer.engine.checkpoint_engine import SnapshotEngine
from trainer.engine.deepspeed_config import deepspeed_config
from trainer.model.build import build_model
from trainer.model.initialization import initialise
from trainer.model.lora import add_adapters
from trainer.model.shape import Architecture, architecture
from trainer.optim import param_groups, warmup_cosine

log = logging.getLogger("zerotrain")

# the optimizer hyper-parameters a resumed run takes from its config, not from the checkpoint
HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")


def init_process_group(backend: str, timeout: timedelta) -> None:
    """Join the process group the launcher's environment describes (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)


class DeepSpeedEngine(Engine):
    def __init__(self, engine, universal: bool, frozen: bool = False):
        """`frozen`: some parameters are not trained (model.lora): checkpoints leave them out, and a load takes
        the trained ones alone (the frozen ones are model.init_from's, or the seed's, again)."""
        self.ds, self.universal, self.frozen = engine, universal, frozen
        if frozen:
            repairs.exclude_frozen_under_every_name(engine)
        self.device, self.module = engine.device, engine.module
        self.schedule = engine.lr_scheduler
        self.hyper = [{key: group[key] for key in HYPER_PARAMETERS} for group in self.schedule.optimizer.param_groups]

    def __call__(self, **inputs):
        return self.ds(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()  # DeepSpeed counts the micro-batches: it updates at the accumulation boundary only

    @contextlib.contextmanager
    def evaluating(self):
        self.ds.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.ds.train()

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def skipped_steps(self) -> int:
        return self.ds.skipped_steps

    def save(self, root: Path, tag: str, writer=None) -> None:
        if writer is not None:  # every file DeepSpeed saves goes through zerotrain's writer
            self.ds.checkpoint_engine = SnapshotEngine.around(self.ds.checkpoint_engine, writer)
        self.ds.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=self.frozen)

    def load(self, root: Path, tag: str, *, weights_only: bool = False) -> None:
        if weights_only:
            self.ds.load_checkpoint(str(root), tag=tag, load_module_only=True, load_optimizer_states=False,
                                    load_lr_scheduler_states=False, custom_load_fn=self._trained_only)
            return
        self.ds.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False,
                                custom_load_fn=self._trained_only)
        if self.universal:
            repairs.zero3_universal_step_tensors(self.ds)
        # DeepSpeed advances the schedule on the steps it applies, not on those it skips (non-finite gradients)
        self._follow_config(self.ds.global_steps - self.ds.skipped_steps)

    @property
    def _trained_only(self):
        """How a checkpoint's module weights load: DeepSpeed's own strict load, or with frozen parameters only the
        trained ones - the state dict DeepSpeed saved still holds a 4-bit base's quantization state (absmax...),
        which must stay the base's own."""
        if not self.frozen:
            return None

        def load(src: dict, dst: torch.nn.Module) -> None:
            trained = [name for name, p in dst.named_parameters() if p.requires_grad]
            missing = [name for name in trained if name not in src]
            if missing:
                raise RuntimeError(f"the checkpoint lacks trained parameters: {missing[:3]}")
            dst.load_state_dict({name: src[name] for name in trained}, strict=False)
        return load

    def _follow_config(self, step: int) -> None:
        """The config's hyper-parameters on every group again, and the schedule at `step` (optimizer steps
        applied): loading restored the checkpoint's."""
        self.schedule.last_epoch = step
        for group, hyper, base, factor in zip(self.schedule.optimizer.param_groups, self.hyper,
                                              self.schedule.base_lrs, self.schedule.lr_lambdas, strict=True):
            group.update(hyper, lr=base * factor(step))
        self.schedule._last_lr = [group["lr"] for group in self.schedule.optimizer.param_groups]


def build_engine(cfg: Config, config: PretrainedConfig, auto_model, universal: bool, fresh_head: bool = False) \
        -> tuple[Engine, Architecture]:
    """The engine, and the model's architecture. `config`: the model's transformers config; `auto_model`: the
    task's transformers Auto class; `fresh_head`: the task replaces a head of init_from's of another size. The shape comes from a build on the meta device first: bucket sizes follow
    its parameter count, and at stage 3 it is then built partitioned (`deepspeed.zero.Init`, unless
    zero.partitioned_init is off): no rank ever holds all of it. `universal`: the run resumes from a universal
    checkpoint (saved by ranks laid out otherwise)."""
    arch = architecture(auto_model, config, cfg.model)
    ds_config = deepspeed_config(cfg, arch.held(cfg.parallel.tensor), universal, largest_parameter=max(arch.sizes),
                                 trainable=arch.trainable, model_type=config.model_type)
    lora = cfg.model.lora
    log.info(f"model: {config.model_type} ({cfg.model.task}), {arch.params / 1e6:.2f}M parameters"
             + (f" ({arch.trainable / 1e6:.2f}M trained: LoRA rank {lora.rank})" if lora else "")
             + f", ZeRO stage {cfg.zero.stage}, {cfg.train.precision}, grad accumulation {cfg.grad_accum}")
    torch.manual_seed(cfg.run.seed)  # the same dropout and other draws on every rank
    # While this object lives, transformers builds (and loads) models inside deepspeed.zero.Init.
    zero_init = HfDeepSpeedConfig(ds_config) if cfg.zero.stage == 3 and cfg.zero.partitioned_init else None
    model = build_model(cfg.model, config, auto_model, fresh_head)
    if cfg.model.init_from is None:  # the same weights at every stage, partitioned or not, on any number of ranks
        initialise(model, cfg.run.seed, gather=deepspeed.zero.GatheredParameters if zero_init else None)
    if zero_init:
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        log.info(f"model built partitioned (deepspeed.zero.Init): this rank holds {held / 1e6:.2f}M of "
                 f"{arch.params / 1e6:.2f}M parameters")
    if lora:  # while zero_init lives: PEFT copies modules_to_save gathered under ZeRO 3
        model = add_adapters(model, lora, cfg.model.task, cfg.run.seed)
    if cfg.parallel.expert > 1:
        repairs.output_recorders_by_class_name()
    o = cfg.optim
    factor = warmup_cosine(o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio)
    groups = param_groups(model, o.weight_decay, named=cfg.parallel.expert > 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups,
                                      lr_scheduler=lambda optimizer: LambdaLR(optimizer, factor), config=ds_config)
    del zero_init
    if cfg.train.compile:  # compiled lazily, at the first forward and backward
        engine.compile()  # DeepSpeed's: torch.compile of the module, its ZeRO hooks kept around it
    return DeepSpeedEngine(engine, universal, frozen=lora is not None), arch
