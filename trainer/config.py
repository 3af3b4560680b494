"""The run configuration: one YAML file, typed and validated here and nowhere else.

`load_config` reads the YAML, applies `--set a.b=value` overrides, validates types with pydantic
and then the combinations pydantic cannot see (batch divisibility, precision vs. device). Every
problem becomes a `ConfigError` whose message is one line naming the key path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_pipeline.config import DataConfig, TokenizerConfig


# A Hugging Face Hub name: 'bert-base-uncased', 'org/model-name' (a path that exists locally is a folder instead)
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ConfigError(ValueError):
    """A bad configuration: the message names the key path (or file, or flag) and the problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: Path
    seed: int = 1234


class ModelSection(Section):
    # causal_lm: pretraining / next-token fine-tuning; classification: a label per text, a linear head on the
    # encoder's pooled output (AutoModelForSequenceClassification)
    task: Literal["causal_lm", "classification"] = "causal_lm"
    type: str = "llama"  # a transformers model_type, built with AutoConfig.for_model
    config: dict[str, Any] = {}  # fields of that transformers config; vocab_size comes from the tokenizer
    # start from this Hugging Face model: a folder (e.g. a zerotrain export) or a Hub name (needs the internet)
    init_from: Path | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute


class TrainSection(Section):
    micro_batch_size: int = Field(ge=1)  # sequences per rank per forward pass
    global_batch_size: int = Field(ge=1)  # sequences per optimizer step, all ranks; fixes grad accumulation
    max_steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: validate at the end only
    eval_batches: int = Field(16, ge=1)  # validation micro-batches, over all ranks
    max_nonfinite_steps: int = Field(3, ge=1)  # stop after this many NaN/inf losses in a row (none are saved)
    # Keep the checkpoint with the best value of this validation metric (checkpoints/best; `export --tag best`):
    # val/loss or val/ppl (lower is better), val/accuracy or val/macro_f1 (classification; higher is better).
    best_metric: Literal["val/loss", "val/ppl", "val/accuracy", "val/macro_f1"] | None = None
    early_stopping: int = Field(0, ge=0)  # stop after this many validations without a better best_metric; 0: off


class CheckpointSection(Section):
    every: int = Field(0, ge=0)  # steps between checkpoints; 0: only at the end
    keep_last: int = Field(3, ge=1)  # the newest checkpoints kept; older ones are deleted after each save
    keep_every: int = Field(0, ge=0)  # also keep every checkpoint whose step is a multiple of this (milestones)


class ZeroSection(Section):
    stage: Literal[0, 1, 2, 3] = 2
    # Stage 3: build the model already partitioned (deepspeed.zero.Init), so no rank ever holds all of it.
    # Its random initialisation then differs from the whole-model one of stages 0-2 (same distribution).
    partitioned_init: bool = True
    # Where optimizer states (fp32 master, Adam moments; stage 1-3, nvme: stage 3) and parameters (stage 3) live
    # between uses: cpu memory, or swap files in zero.nvme_path (DeepSpeed's async_io op, which needs libaio).
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: Path | None = None  # a folder on a fast local disk for the swap files (under it: run name, rank)


class LaunchSection(Section):
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)  # ranks per node: one per GPU on GPU nodes
    stop_timeout: int = Field(300, ge=1)  # seconds the ranks get to save after a stop signal before being killed
    max_restarts: int = Field(0, ge=0)  # restarts after a failure (agent or Slurm requeue), each from the last save


class Config(Section):
    run: RunSection
    model: ModelSection = ModelSection()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig
    train: TrainSection
    checkpoint: CheckpointSection = CheckpointSection()
    zero: ZeroSection = ZeroSection()
    launch: LaunchSection = LaunchSection()

    @property
    def world_size(self) -> int:
        return self.launch.nnodes * self.launch.nproc_per_node

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.world_size)

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] = (), *, cuda_available: bool | None = None) -> Config:
    """Read, override, validate. `cuda_available=None` skips the checks that depend on the device."""
    raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    _absolutize_paths(raw)
    _default_tokenizer(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    _check_combinations(cfg, cuda_available)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, train, ...)")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value is parsed as YAML, so numbers, booleans and lists keep their types."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = yaml.safe_load(text) if text else ""


def _absolutize_paths(raw: dict) -> None:
    """Relative paths are relative to the directory the command runs in; ranks get absolute ones."""

    def absolute(p: Any) -> Any:
        return str(Path(p).expanduser().absolute()) if isinstance(p, str) else p

    def folder_or_hub(p: Any) -> Any:
        """A model or tokenizer: a local folder, or a Hub name ('org/name'), which stays relative."""
        hub = isinstance(p, str) and HUB_NAME.fullmatch(p) and not Path(p).expanduser().exists()
        return p if hub else absolute(p)

    for section, key, resolve in (("run", "output_dir", absolute), ("data", "prepared_dir", absolute),
                                  ("tokenizer", "path", folder_or_hub), ("model", "init_from", folder_or_hub),
                                  ("zero", "nvme_path", absolute)):
        if isinstance(raw.get(section), dict) and raw[section].get(key) is not None:
            raw[section][key] = resolve(raw[section][key])

    def source(s: Any) -> Any:
        return {**s, "path": absolute(s.get("path"))} if isinstance(s, dict) else absolute(s)

    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("sources"), list):
            data["sources"] = [source(s) for s in data["sources"]]
        for split in ("validation", "test"):
            if data.get(split) is not None:
                data[split] = source(data[split])


def _default_tokenizer(raw: dict) -> None:
    """A classifier reads text with its own model's tokenizer unless tokenizer.path says otherwise."""
    model, tokenizer = raw.get("model"), raw.setdefault("tokenizer", {})
    if isinstance(model, dict) and model.get("task") == "classification" and model.get("init_from") \
            and isinstance(tokenizer, dict) and tokenizer.get("path") is None:
        tokenizer["path"] = model["init_from"]


# pydantic's wording where a config user needs other words
_MESSAGES = {"extra_forbidden": "unknown key", "model_type": "expected a section (a mapping of keys)",
             "missing": "required key is missing"}


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "config"
    message = _MESSAGES.get(first["type"], first["msg"][0].lower() + first["msg"][1:])
    value = "" if first["type"] == "missing" else f" (got {first['input']!r})"
    more = error.error_count() - 1
    return f"{loc}: {message}{value}" + (f" [and {more} more problem(s)]" if more else "")


def _check_combinations(cfg: Config, cuda_available: bool | None) -> None:
    t, z = cfg.train, cfg.zero
    per_step = t.micro_batch_size * cfg.world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x world size ({cfg.world_size})"
        )
    if t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} exceeds train.max_steps ({t.max_steps})")
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
    if cuda_available is False and t.precision == "fp16":
        raise ConfigError("train.precision: fp16 needs a CUDA GPU and none is visible; use bf16 or fp32")
    if not math.isfinite(t.lr):
        raise ConfigError(f"train.lr: must be a finite number (got {t.lr})")
    if cfg.data.mode == "streaming":
        _check_streaming(cfg)
    _check_task(cfg)
    _check_model_fields(cfg.model)


def _check_task(cfg: Config) -> None:
    t = cfg.train
    if t.early_stopping and t.best_metric is None:
        raise ConfigError("train.early_stopping: needs train.best_metric, the metric whose improvement it waits for")
    if cfg.model.task == "causal_lm":
        if t.best_metric in ("val/accuracy", "val/macro_f1"):
            raise ConfigError(f"train.best_metric: {t.best_metric} is a classification metric; use val/loss or "
                              "val/ppl for model.task causal_lm")
        return
    if cfg.data.mode == "streaming":
        raise ConfigError("data.mode: classification reads prepared labelled data; use data.mode: prepared")
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: classification tokenizes with the model's own tokenizer; set "
                          "model.init_from (its tokenizer is used) or tokenizer.path")
    if t.best_metric == "val/ppl":
        raise ConfigError("train.best_metric: val/ppl is a language-model metric; use val/loss, val/accuracy "
                          "or val/macro_f1 for classification")


def _check_streaming(cfg: Config) -> None:
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: streaming mode trains no tokenizer; give an existing tokenizer folder")
    source = cfg.data.sources[0]
    if len(cfg.data.sources) > 1 or source.path is None:
        raise ConfigError("data.sources: streaming mode reads one source of local files (no mixture, no Hub); "
                          "prepare the data for mixtures")


def _check_model_fields(model: ModelSection) -> None:
    from transformers import AutoConfig  # imported here: a second of start-up only where needed

    if model.init_from is not None:
        if model.init_from.is_absolute() and not (model.init_from / "config.json").is_file():  # (else a Hub name)
            raise ConfigError(f"model.init_from: {model.init_from} is not a Hugging Face model folder (no config.json)")
        if model.config:
            raise ConfigError("model.config: the architecture comes from model.init_from; leave model.config empty")
        return

    try:
        defaults = AutoConfig.for_model(model.type)
    except ValueError:
        raise ConfigError(f"model.type: {model.type!r} is not a transformers model type (e.g. llama, gpt2)") from None
    for key in model.config:
        if key == "vocab_size":
            raise ConfigError("model.config.vocab_size: set by the tokenizer; set tokenizer.vocab_size instead")
        if not hasattr(defaults, key):
            raise ConfigError(f"model.config.{key}: not a field of {type(defaults).__name__}")
