"""Consolidate a run's checkpoint into a Hugging Face `save_pretrained` folder: the fp32 master weights
(trainer/engine/weights.py), the config, the task's additions (labels, generation config) and the tokenizer."""

from __future__ import annotations

from pathlib import Path

from accelerate import init_empty_weights

from data_pipeline import load_tokenizer
from data_pipeline.errors import UserError
from trainer.checkpointing import store
from trainer.config import ConfigError, load_config
from trainer.engine.weights import fp32_weights
from trainer.tasks import task_of


def choose(run_dir: Path, tag: str | None) -> store.Found:
    """The checkpoint to export, verified like a resume verifies it: `latest` (the default) is the newest intact
    one; `best` or a step's tag must be intact itself."""
    if not store.checkpoints_dir(run_dir).is_dir():
        raise UserError(f"{run_dir}: not a run directory with checkpoints")
    if tag == "best":
        tag = store.pointer(run_dir, store.BEST)
        if tag is None:
            raise UserError(f"{run_dir}: no best checkpoint (set eval.best_metric to keep one)")
    elif tag not in (None, "latest") and not store.TAG.fullmatch(tag):
        raise ConfigError(f"--tag: {tag!r} is not a checkpoint (step_00000100, best or latest)")
    found = store.find_intact(run_dir, store.checksums, tag=None if tag in (None, "latest") else tag)
    if found.tag is None:
        raise UserError(f"{run_dir}: no intact checkpoint to export" +
                          (f" ({found.damaged[0]})" if found.damaged else ""))
    return found


def export(run_dir: Path, out_dir: Path, tag: str | None = None) -> tuple[Path, str, list[str]]:
    """Writes safetensors weights (fp32 master copy), config (with the label names of a classifier),
    generation config and tokenizer. `tag`: a step's, "best" or "latest" (the default). Returns the folder,
    the transformers Auto class that loads it, and the damaged checkpoints passed over."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not an empty folder; choose another export folder")
    found = choose(run_dir, tag)
    ckpt = store.checkpoints_dir(run_dir) / found.tag
    cfg = load_config(ckpt / "config.yaml")  # the config the checkpoint was trained with
    if cfg.zero.offload_optimizer == "nvme":
        raise UserError(f"{ckpt}: its fp32 weights are in NVMe swap files (zero.offload_optimizer: nvme), which "
                          "DeepSpeed's consolidation cannot read; export a checkpoint of a run without NVMe "
                          "optimizer offload")
    task = task_of(cfg)
    data = task.open_data(cfg)
    tokenizer = load_tokenizer(data.tokenizer_dir, require_eos=False)
    if data.chat_template:  # streamed chat data: data.chat.template, if given, is not the tokenizer folder's
        tokenizer.chat_template = data.chat_template
    with init_empty_weights():  # no throw-away initialisation of a large model
        model = task.auto_model.from_config(task.model_config(cfg.model, data.vocab_size, data))
    model.tie_weights()  # as the trained model was: a tied output layer is not a parameter of its own
    # Not strict: the tied output layer's name is not among the weights (tie_weights points it again).
    weights = fp32_weights(ckpt, cfg, model, made=store.universal_dir(ckpt.parent, ckpt.name))
    _, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, t in model.state_dict().items() if t.is_meta]
    if unexpected or missing:
        raise UserError(f"{ckpt}: its weights do not fit the model of its config.yaml (missing: "
                        f"{missing[:3]}, unexpected: {unexpected[:3]})")
    task.finish_export(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, task.auto_model.__name__, found.damaged
