"""The pre-flight: everything about a run that can be checked before any rank starts, in one place, called by
`zerotrain train` and `zerotrain submit`. A problem is a one-line `UserError` naming the key, file or flag;
what the user should know but need not fix comes back as notes. Its decision of where the run resumes is what
the ranks act on."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.errors import DataError
from trainer import resources
from trainer.checkpointing import resume as resuming
from trainer.checkpointing import store
from trainer.checkpointing.resume import ResumePoint
from trainer.config import Config, ConfigError
from trainer.data import TrainingData
from trainer.engine import DEEPSPEED
from trainer.engine.autoep import check_expert_split
from trainer.model.shape import check_attention_installed, check_runs, check_sequence_split, check_tensor_split
from trainer.tasks import task_of


@dataclass
class Preflight:
    data: TrainingData
    resume: ResumePoint | None  # the checkpoint the run continues from; None: it starts fresh
    notes: list[str] = field(default_factory=list)
    finished: bool = False  # the checkpoint is already at train.max_steps: nothing to train


def preflight(cfg: Config, resume: str, allow_data_change: bool, on_training_machine: bool = True) -> Preflight:
    """`resume`: "auto" continues the newest intact checkpoint, "none" refuses a run directory that has one.
    `on_training_machine`: also check what only the machine that trains has (its memory, NVMe offload's folder
    and op)."""
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        raise ConfigError(f"run.output_dir: {cfg.run_dir} is a file, not a folder")
    task = task_of(cfg)
    data = task.open_data(cfg)
    data.check()
    task.check_data(cfg, data)
    model = task.model_config(cfg.model, data.vocab_size, data)  # an init_from model must fit the data's vocabulary
    check_runs(cfg.model, model, task.auto_model, task.meta_inputs(cfg.train.micro_batch_size, cfg.data.seq_len))
    task.check_model(cfg, model)
    check_sequence_split(model, cfg.parallel.sequence)
    check_tensor_split(model, cfg.parallel.tensor)
    check_expert_split(model, cfg.parallel.expert)
    checked = _resume(cfg, data, resume, allow_data_change)
    checked.notes += resources.check(cfg, task.auto_model, model, on_training_machine)
    if on_training_machine:
        from trainer.engine.nvme import check_nvme_offload

        check_nvme_offload(cfg)
        check_attention_installed(cfg.model)
    return checked


def _resume(cfg: Config, data: TrainingData, resume: str, allow_data_change: bool) -> Preflight:
    """Never overwrite a run by accident, and refuse resuming what cannot continue exactly. Sizes only here;
    the ranks verify the checksums of the checkpoint they load."""
    tags = store.saved_tags(store.checkpoints_dir(cfg.run_dir))
    if tags and resume == "none":
        raise ConfigError(f"run.output_dir: {cfg.run_dir} already holds checkpoints (latest {tags[-1]}); "
                          "pass --resume auto to continue it, or choose another run.output_dir")
    point = resuming.decide(cfg.run_dir, cfg.layout)
    if point is None:
        return Preflight(data, None)
    state = store.read_state(point.folder(cfg.run_dir))
    if state.step >= cfg.train.max_steps:  # about to say the run is finished: only if its checkpoint is intact
        point = resuming.decide(cfg.run_dir, cfg.layout, store.checksums)
        state = store.read_state(point.folder(cfg.run_dir))
    notes = [f"checkpoint {problem}; falling back to an older one" for problem in point.damaged]
    if state.data_fingerprint != data.fingerprint and not allow_data_change:
        raise DataError(f"data.prepared_dir: checkpoint {point.tag} was trained on other prepared data (corpus or "
                        "tokenizer changed); resume with the data it was trained on, or pass --allow-data-change")
    resuming.check_continues(cfg, point, state, data.vocab_size)
    if cfg.zero.offload_optimizer == "nvme":
        notes.append(f"checkpoint {point.tag}: DeepSpeed {DEEPSPEED} does not load an NVMe-offloaded optimizer's state; "
                     "the run continues from the saved weights with fresh Adam moments (not an exact resume)")
    if point.other_ranks:
        if not data.resumes_on_other_ranks:
            raise ConfigError(f"launch.nproc_per_node: checkpoint {point.tag} was saved by {point.saved}; "
                              "streaming data resumes on ranks laid out the same only (prepared data resumes on "
                              "any)")
        notes.append(f"checkpoint {point.tag} was saved by {point.saved}; resuming on {cfg.layout} "
                     f"(global batch {cfg.train.global_batch_size} kept, gradient accumulation {cfg.grad_accum})")
        if point.universal:
            notes.append("its ZeRO partitions will load through a universal checkpoint")
    return Preflight(data, point, notes, finished=state.step >= cfg.train.max_steps)
