"""Consolidate a run's checkpoint into a Hugging Face `save_pretrained` folder: the fp32 master weights
(trainer/engine/weights.py), the config, the task's additions (labels, generation config) and the tokenizer."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from accelerate import init_empty_weights
from transformers import PreTrainedModel

from data_pipeline import load_tokenizer
from data_pipeline.errors import UserError
from trainer.checkpointing import store
from trainer.config import ConfigError, load_config
from trainer.engine.weights import fp32_weights
from trainer.model.build import build_model
from trainer.model.initialization import initialise
from trainer.model.lora import TASK_CONFIG, add_adapters
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


def export(run_dir: Path, out_dir: Path, tag: str | None = None, merge: bool = False,
           prepared_dir: Path | None = None) -> tuple[Path, str, list[str]]:
    """Writes safetensors weights (fp32 master copy), config (with the label names of a classifier),
    generation config and tokenizer. `tag`: a step's, "best" or "latest" (the default). A LoRA run (model.lora)
    exports its adapter in PEFT's format, or with `merge` the base model with the adapters merged into its
    weights. `prepared_dir`: where the run's prepared data is now (default: where it was trained from). Returns
    the folder, what loads it, and the damaged checkpoints passed over."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not an empty folder; choose another export folder")
    found = choose(run_dir, tag)
    ckpt = store.checkpoints_dir(run_dir) / found.tag
    cfg = load_config(ckpt / "config.yaml")  # the config the checkpoint was trained with
    if prepared_dir is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"prepared_dir": prepared_dir})})
    if merge and cfg.model.lora is None:
        raise ConfigError(f"--merge: {ckpt} trained all the model's weights (no model.lora): there are no adapters "
                          "to merge; export without --merge")
    if merge and cfg.model.lora is not None and _stored_quantized(cfg.model.init_from):
        raise ConfigError(f"--merge: the base model {cfg.model.init_from} is stored quantized (its config.json has a "
                          "quantization_config); merging needs the base in full precision: export the adapter "
                          "alone, or train on a full-precision base (model.lora.quantize quantizes it as it loads)")
    if cfg.model.lora is not None and not merge and cfg.model.init_from is None:
        raise ConfigError(f"--merge: the base model of {ckpt} was drawn from run.seed (no model.init_from) and is "
                          "saved nowhere, so its adapter alone could not be loaded; export with --merge")
    if cfg.zero.offload_optimizer == "nvme":
        raise UserError(f"{ckpt}: its fp32 weights are in NVMe swap files (zero.offload_optimizer: nvme), which "
                          "DeepSpeed's consolidation cannot read; export a checkpoint of a run without NVMe "
                          "optimizer offload")
    task = task_of(cfg)
    data = task.open_data(cfg)
    tokenizer = load_tokenizer(data.tokenizer_dir, require_eos=False)
    if data.chat_template:  # streamed chat data: data.chat.template, if given, is not the tokenizer folder's
        tokenizer.chat_template = data.chat_template
    config = task.model_config(cfg.model, data.vocab_size, data)
    adapter = cfg.model.lora is not None and not merge
    model = _trained_model(ckpt, cfg, task, config, base_weights=not adapter)
    task.finish_export(model, tokenizer)
    if adapter:  # PEFT's files, naming the base; beside them the task's config (a classifier's labels)
        model.peft_config["default"].base_model_name_or_path = str(cfg.model.init_from)
        out_dir.mkdir(parents=True, exist_ok=True)
        trained = model.get_base_model()
        trained.config.architectures = [type(trained).__name__]
        trained.config.to_json_file(out_dir / TASK_CONFIG)
    elif cfg.model.lora is not None:
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, "PeftModel" if adapter else task.auto_model.__name__, \
        found.damaged


def _trained_model(ckpt: Path, cfg, task, config, base_weights: bool) -> PreTrainedModel:
    """The model with the checkpoint's trained weights: all of them, or with model.lora the base model with the
    trained adapters - with its weights (model.init_from's, or drawn from the seed again) if `base_weights`, else
    on the meta device (an adapter's export needs the adapters only)."""
    if cfg.model.lora is None or not base_weights:
        with init_empty_weights():  # no throw-away initialisation of a large model
            model = task.auto_model.from_config(config)
    else:
        _check_base(cfg.model, ckpt)
        model = build_model(cfg.model, config, task.auto_model, task.fresh_head, quantized=False)
        if cfg.model.init_from is None:
            initialise(model, cfg.run.seed)
    if cfg.model.lora is not None:
        with init_empty_weights(include_buffers=False) if not base_weights else contextlib.nullcontext():
            model = add_adapters(model, cfg.model.lora, cfg.model.task, cfg.run.seed)
    model.tie_weights()  # as the trained model was: a tied output layer is not a parameter of its own
    # Not strict: the tied output layer's name is not among the weights (tie_weights points it again), nor is a
    # LoRA run's frozen base.
    weights = fp32_weights(ckpt, cfg, model, made=store.universal_dir(ckpt.parent, ckpt.name))
    _, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters()
               if (p.requires_grad and name not in weights) or (p.is_meta and (base_weights or p.requires_grad))]
    if unexpected or missing:
        raise UserError(f"{ckpt}: its weights do not fit the model of its config.yaml (missing: "
                        f"{missing[:3]}, unexpected: {unexpected[:3]})")
    return model


def _stored_quantized(init_from: Path | None) -> bool:
    return init_from is not None and (init_from / "config.json").is_file() and \
        "quantization_config" in json.loads((init_from / "config.json").read_text())


def _check_base(section, ckpt: Path) -> None:
    """The base model the adapters are merged into is the one they were trained on."""
    from trainer.model.lora import base_of

    recorded = store.read_state(ckpt).base_fingerprint
    if recorded != base_of(section):
        raise UserError(f"model.init_from: {section.init_from} is not the base model the adapters of {ckpt} were "
                        "trained on (its weights changed since); restore it to export")
