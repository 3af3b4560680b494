"""The run configuration: one YAML file, typed and validated here and nowhere else.

`load_config` reads the YAML (refusing a key written twice), applies `--set a.b=value` overrides, validates
types with pydantic and then the combinations pydantic cannot see (batch divisibility, precision vs. device).
Every problem becomes a `ConfigError` whose message is one line naming the key path.

Sections follow the components that read them: `optim` the optimizer and its schedule, `train` the loop
(batches, steps, precision, logging, the non-finite policy), `eval` the evaluator, `checkpoint` the
checkpointer, `zero` DeepSpeed, `launch` the launcher. What the task, the engine (DeepSpeed's limits) and the
parallel layout require of the combination is checked by them (trainer/tasks, trainer/engine/limits.py).

Every field declares what a resumed run may do with it (`on_resume`, or its section's RESUME): keep the
checkpoint's value, set it anew, or - the data's fields - leave it to the data's fingerprint.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from data_pipeline.config import FIXED, MAY_CHANGE, DataConfig, TokenizerConfig, on_resume
from data_pipeline.errors import UserError
from trainer.parallel.layout import ParallelLayout


# A Hugging Face Hub name: 'bert-base-uncased', 'org/model-name' (a path that exists locally is a folder instead)
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ConfigError(UserError):
    """A bad configuration: the message names the key path (or file, or flag) and the problem."""


Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's moment decay: 1 would never forget, more would diverge
MAX_SECONDS = int(timedelta.max.total_seconds())  # the longest timeout Python's timedelta holds


class Section(BaseModel):
    # no NaN or infinity in any number of the config: a value that is not finite is a typo, never a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
    RESUME: ClassVar[str] = FIXED  # what a resumed run may do with the fields that declare nothing themselves


class RunSection(Section):
    name: str = on_resume(MAY_CHANGE, pattern=r"^[A-Za-z0-9._-]+$")
    """names folders (NVMe swap files) and Slurm jobs: letters, digits, . _ -, not only dots (. and .. are
    folders)"""
    output_dir: Path = on_resume(MAY_CHANGE)
    """the run directory: checkpoints, logs, metrics, TensorBoard events, the report"""
    seed: int = Field(1234, ge=0, lt=2**32)
    """the seed of every draw: initial weights, adapters, data order, dropout (below 2^32: numpy's seeds are 32-bit)"""

    @field_validator("name")
    @classmethod
    def _not_a_folder_of_its_own(cls, name: str) -> str:
        if not name.strip("."):
            raise ValueError("a name of dots only names a folder above the one it is in; use letters or digits")
        return name


class LoraSection(Section):
    """Low-rank adapters (LoRA, through PEFT) on a frozen base model: only the adapters and `modules_to_save` are
    trained (trainer/model/lora.py). A run cannot switch them on or off, nor reshape them, on resume."""

    rank: int = Field(16, ge=1)
    """r: the adapters' inner dimension, at most a target layer's smaller side"""
    alpha: float = Field(32, gt=0)
    """the adapters' output is scaled by alpha / rank"""
    dropout: float = on_resume(MAY_CHANGE, 0.0, ge=0, lt=1)
    """on the adapters' input, while training"""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """The layers that get adapters: module names (a name's last parts, e.g. q_proj, or a full name) or
    all-linear: every linear layer of the transformer blocks (not the output layer or a classifier head)"""
    modules_to_save: list[str] = []
    """Modules trained fully beside the adapters, e.g. embed_tokens (new tokens); a classifier's head always is"""
    quantize: Literal["4bit"] | None = None
    """QLoRA: the frozen base's linear layers in 4 bits (NF4, bitsandbytes; computed in bf16): 0.56 B per weight
    instead of 2. Needs model.init_from, train.precision bf16 and zero.stage 0-2."""

    @field_validator("target_modules", "modules_to_save")
    @classmethod
    def _names(cls, names):
        if isinstance(names, list) and not all(name.strip() for name in names):
            raise ValueError("an empty module name")
        return names


class ModelSection(Section):
    task: str = "causal_lm"
    """What is learned: causal_lm, pretraining / next-token fine-tuning; classification, a label per text (a
    linear head on the encoder's pooled output). trainer/tasks has one module per task."""
    type: str = "llama"
    """a transformers model_type, built with AutoConfig.for_model"""
    config: dict[str, Any] = {}
    """fields of that transformers config; vocab_size comes from the tokenizer"""
    init_from: Path | None = on_resume(MAY_CHANGE, None)
    """start from this Hugging Face model: a folder (e.g. a zerotrain export) or a Hub name (needs the internet)"""
    gradient_checkpointing: bool = on_resume(MAY_CHANGE, False)
    """recompute activations in backward: less memory, ~1/3 more compute"""
    attention: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] | None = \
        on_resume(MAY_CHANGE, None)
    """transformers' attention implementation: sdpa (its default), eager, flex_attention, flash_attention_2 or _3
    (need the flash-attn package where the ranks run)"""
    lora: LoraSection | None = None
    """train low-rank adapters on the frozen model instead of all its weights"""

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        from trainer.tasks import TASKS  # the registry imports this module: read it when a config is validated

        if task not in TASKS:
            raise ValueError(f"not a task; one of {', '.join(TASKS)}")
        return task


class OptimSection(Section):
    """AdamW and its learning-rate schedule: linear warmup, then cosine decay."""

    RESUME = MAY_CHANGE

    lr: float = Field(gt=0, le=1)
    """the peak learning rate, reached after warmup_steps"""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """cosine decays to lr * min_lr_ratio"""
    warmup_steps: int = Field(0, ge=0)
    """optimizer steps of linear warmup from lr / warmup_steps to lr"""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW's decoupled weight decay, on matrices only (not norms or biases)"""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """Adam's moment decays"""
    grad_clip: float = Field(1.0, ge=0)
    """0 disables clipping"""


class TrainSection(Section):
    micro_batch_size: int = on_resume(MAY_CHANGE, ge=1)
    """sequences per rank per forward pass"""
    global_batch_size: int = on_resume(MAY_CHANGE, ge=1)
    """sequences per optimizer step, all ranks; fixes grad accumulation"""
    max_steps: int = on_resume(MAY_CHANGE, ge=1)
    """optimizer steps of the whole run (the schedule's length)"""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """the dtype the model computes in (DeepSpeed keeps fp32 master weights for bf16 and fp16; fp16 needs a GPU)"""
    grad_accum_dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """The dtype gradients are summed in over the micro-batches of a step. Default: fp32 under bf16 at ZeRO 1-3
    (bf16 sums lose precision every micro-batch), else the training precision (see Config.grad_accum_dtype)."""
    log_every: int = on_resume(MAY_CHANGE, 10, ge=1)
    """steps between log lines and metric records (step 1 and the last step always log)"""
    max_nonfinite_steps: int = on_resume(MAY_CHANGE, 3, ge=1)
    """stop after this many NaN/inf losses in a row (none are saved)"""
    loss_chunk_tokens: int | None = on_resume(MAY_CHANGE, None, ge=0)
    """Tokens per chunk of the causal-LM loss, each chunk's fp32 logits recomputed in backward instead of kept:
    the fp32 copy of a micro-batch's logits never exists. Default: chunks of 64 MiB of fp32 logits when the
    whole would exceed 512 MiB (large vocabularies, long sequences); 0: never chunk."""
    compile: bool = on_resume(MAY_CHANGE, False)
    """torch.compile (inductor) the model, through DeepSpeed's engine.compile(), and the loss's fp32
    cross-entropy. Off by default: compiling costs each launch tens of seconds on CPU (see docs/performance.md)."""
    peak_tflops: float | None = on_resume(MAY_CHANGE, None, gt=0)
    """The FLOP/s one rank can reach (TFLOP/s), the denominator of MFU. Default: the data sheet of a known GPU,
    otherwise a matmul probe at start-up (half a second per launch)."""


class EvalSection(Section):
    RESUME = MAY_CHANGE
    every: int = Field(0, ge=0)
    """steps between validations; 0: validate at the end only"""
    batches: int = Field(16, ge=1)
    """validation micro-batches of pretraining data, over all ranks"""
    best_metric: Literal["val/loss", "val/ppl", "val/accuracy", "val/macro_f1"] | None = None
    """Keep the checkpoint with the best value of this validation metric (checkpoints/best; `export --tag best`):
    val/loss or val/ppl (lower is better), val/accuracy or val/macro_f1 (classification; higher is better)."""
    early_stopping: int = Field(0, ge=0)
    """stop after this many validations without a better best_metric; 0: off"""
    at_start: bool = False
    """also validate the starting weights, before the first step (logged as step 0)"""


class CheckpointSection(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True,
                              use_attribute_docstrings=True)
    RESUME = MAY_CHANGE

    every: int = Field(0, ge=0)
    """steps between checkpoints; 0: only at the end"""
    async_: bool = Field(True, alias="async")
    """Write, fsync and hash a save in the background while training goes on; the loop stands still only while
    the state is copied to host memory (one save's share of this rank's files). `async` is a Python keyword."""
    keep_last: int = Field(3, ge=1)
    """the newest checkpoints kept; older ones are deleted after each save"""
    keep_every: int = Field(0, ge=0)
    """also keep every checkpoint whose step is a multiple of this (milestones)"""


class ZeroSection(Section):
    stage: Literal[0, 1, 2, 3] = 2
    """the ZeRO stage: 0 data parallel, 1 partitions optimizer states, 2 also gradients, 3 also parameters"""
    partitioned_init: bool = on_resume(MAY_CHANGE, True)
    """Stage 3: build the model already partitioned (deepspeed.zero.Init), so no rank ever holds all of it. Its
    initial weights are the whole build's (trainer/initialization.py draws them per module from the seed)."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where optimizer states (fp32 master, Adam moments; stage 1-3, nvme: stage 3) and parameters (stage 3) live
    between uses: cpu memory, or swap files in zero.nvme_path (DeepSpeed's async_io op, which needs libaio)."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """where stage-3 parameters live between uses: on the device, in cpu memory, or in swap files"""
    nvme_path: Path | None = on_resume(MAY_CHANGE, None)
    """a folder on a fast local disk for the swap files (under it: run name, rank)"""


class LaunchSection(Section):
    RESUME = MAY_CHANGE

    nnodes: int = Field(1, ge=1)
    """nodes of the job (each runs `zerotrain train` with the same config, or srun/mpirun starts the ranks)"""
    nproc_per_node: int = Field(1, ge=1)
    """ranks per node: one per GPU on GPU nodes"""
    stop_timeout: int = Field(300, ge=1, le=MAX_SECONDS)
    """seconds the ranks get to save after a stop signal before being killed"""
    max_restarts: int = Field(0, ge=0)
    """restarts after a failure (agent or Slurm requeue), each from the last save"""
    collective_timeout: int = Field(1800, ge=10, le=MAX_SECONDS)
    """Seconds a collective waits for a missing peer before the job fails (a dead or hung rank must end the job).
    Long operations (verifying and converting checkpoints) are shared by the ranks and never wait this long."""


class ParallelSection(Section):
    """The degrees of the parallel layout (trainer/parallel/layout.py); a resumed run may change them."""

    RESUME = MAY_CHANGE
    sequence: int = Field(1, ge=1)
    """Ulysses sequence parallelism: each sample's sequence split over this many ranks (activations / N). The
    data-parallel degree is the world size over it; train.global_batch_size stays samples per optimizer step."""
    tensor: int = Field(1, ge=1)
    """AutoTP tensor parallelism: each linear layer's weight split over this many ranks (model states / N, the
    embedding replicated); they train the same samples. ZeRO 0-2."""
    expert: int = Field(1, ge=1)
    """Expert parallelism (DeepSpeed's AutoEP) of a mixture-of-experts model: each rank holds 1/N of every MoE
    layer's experts and tokens travel all-to-all to theirs; the ranks still train different samples."""


class MlflowSection(Section):
    """MLflow: the resolved config as params, the metrics, report.png and summary.json as artifacts, the Slurm
    job as tags (trainer/observe/trackers.py)."""

    RESUME = MAY_CHANGE
    tracking_uri: str | None = None
    """the tracking server (http://host:5000) or store; default: the MLFLOW_TRACKING_URI environment variable"""
    experiment: str = Field("zerotrain", min_length=1)
    """the experiment the run is filed under (created if missing)"""


class WandbSection(Section):
    """Weights & Biases: the resolved config, the metrics, report.png and summary.json; the Slurm job as tags."""

    RESUME = MAY_CHANGE
    project: str = Field("zerotrain", min_length=1)
    """the W&B project"""
    entity: str | None = None
    """the team or user the project belongs to; default: the logged-in user's"""
    mode: Literal["online", "offline"] = "online"
    """offline: the run is written under RUN_DIR/wandb only, for `wandb sync` later (no network needed)"""


TRACKERS = ("tensorboard", "mlflow", "wandb")


class MetricsSection(Section):
    """Where the metrics go. RUN_DIR/metrics.jsonl and the console always get them; the trackers listed here
    too, from rank 0 only. A resumed run continues each tracker's run (RUN_DIR/trackers.json)."""

    RESUME = MAY_CHANGE
    trackers: list[Literal[TRACKERS]] = ["tensorboard"]
    """any of tensorboard (RUN_DIR/tensorboard), mlflow, wandb"""
    mlflow: MlflowSection = MlflowSection()
    """where the mlflow tracker sends the run (below)"""
    wandb: WandbSection = WandbSection()
    """where the wandb tracker sends the run (below)"""

    @field_validator("trackers")
    @classmethod
    def _each_once(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) < len(trackers):
            raise ValueError(f"a tracker listed twice: {trackers}")
        return trackers


class Config(Section):
    run: RunSection
    model: ModelSection = ModelSection()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig
    optim: OptimSection
    train: TrainSection
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    zero: ZeroSection = ZeroSection()
    parallel: ParallelSection = ParallelSection()
    launch: LaunchSection = LaunchSection()
    metrics: MetricsSection = MetricsSection()

    @property
    def world_size(self) -> int:
        return self.launch.nnodes * self.launch.nproc_per_node

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.world_size, self.parallel.sequence, self.parallel.tensor, self.parallel.expert)

    @property
    def grad_accum(self) -> int:
        return self.layout.grad_accum(self.train.global_batch_size, self.train.micro_batch_size)

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir

    @property
    def grad_accum_dtype(self) -> str:
        from trainer.engine.limits import accumulation_dtype

        return accumulation_dtype(self.train, self.zero.stage)

    @property
    def rank_tokens(self) -> int:
        """Tokens one rank runs per micro-batch: its slice of each sequence under parallel.sequence."""
        return self.train.micro_batch_size * self.data.seq_len // self.parallel.sequence

    @property
    def async_saves(self) -> bool:
        """checkpoint.async, except with the optimizer offloaded to NVMe: DeepSpeed copies its swap files into
        the checkpoint itself, in place."""
        return self.checkpoint.async_ and self.zero.offload_optimizer != "nvme"

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] = (), *, cuda_available: bool | None = None) -> Config:
    """Read, override, validate. `cuda_available=None` skips the checks that depend on the device."""
    raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    _refuse_moved_keys(raw)
    _absolutize_paths(raw)
    _task_defaults(raw)
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
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as text ({e})") from None
    raw = _parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, optim, train, ...)")
    return raw


def _parse_yaml(text: str, where: str):
    """YAML, refusing a key written twice in one mapping (YAML would silently keep the later value)."""
    try:
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), where)
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _refuse_duplicate_keys(node, where: str, path: str = "", keys=None) -> None:
    """Compares the keys' values, as YAML reads them (`yes` and `true` are one key); `<<` merges may override."""
    keys = keys or yaml.SafeLoader("")  # only its constructor is used: a key node to its value
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = keys.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else \
                repr(key_node.value)
            name = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"{where}: {name} is written twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
            _refuse_duplicate_keys(value_node, where, name, keys)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, where, f"{path}.{i}", keys)


def _apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value is parsed as YAML, so numbers, booleans and lists keep their types."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {short(item)!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = _parse_yaml(text, f"--set {key}") if text.strip() else ""  # KEY= sets an empty string


# Keys that moved when the train section was split by component: the old name gets a one-line pointer.
MOVED = {**{f"train.{key}": f"optim.{key}" for key in
            ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip")},
         **{f"train.{old}": f"eval.{new}" for old, new in
            (("eval_every", "every"), ("eval_batches", "batches"), ("best_metric", "best_metric"),
             ("early_stopping", "early_stopping"))}}


def _refuse_moved_keys(raw: dict) -> None:
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{old}: moved to {new}")


def dotted(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: a config's keys by their paths."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: Config, new: Config) -> list[str]:
    """The fields whose value a resumed run may not change (FIXED) and does, as `key old -> new`. Fields that
    MAY_CHANGE are not listed, nor DATA fields (the data's fingerprint judges them)."""
    old, now = (dotted(cfg.model_dump(mode="json")) | {"train.grad_accum_dtype": cfg.grad_accum_dtype}
                for cfg in (saved, new))  # left out or its default given: the same setting
    return [f"{key} {short(old.get(key))} -> {short(now.get(key))}" for key in sorted(set(old) | set(now))
            if old.get(key) != now.get(key) and resume_policy(key) == FIXED]


def resume_policy(key: str) -> str:
    """What a resumed run may do with the config field at dotted path `key` (FIXED, MAY_CHANGE or DATA): the
    field's own `on_resume`, else its section's RESUME, inherited by sections that declare none."""
    section, policy = Config, Config.RESUME
    for part in key.split("."):
        field = section.model_fields.get(part) if section else None
        if field is None:  # inside a dict or list value: the field holding it decides
            return policy
        nested = next((t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                       if isinstance(t, type) and issubclass(t, BaseModel)), None)
        policy = getattr(nested, "RESUME", policy)
        policy = (field.json_schema_extra or {}).get("on_resume", policy)
        section = nested
    return policy


def short(value, limit: int = 60) -> str:
    """A value for a one-line message: never echo a huge one."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _absolutize_paths(raw: dict) -> None:
    """Relative paths are relative to the directory the command runs in; ranks get absolute ones. An empty
    path is refused: it would silently become the current directory."""

    def absolute(p: Any, key: str) -> Any:
        if isinstance(p, str) and not p.strip():
            raise ConfigError(f"{key}: an empty path; give a file or folder")
        return str(Path(p).expanduser().absolute()) if isinstance(p, str) else p

    def folder_or_hub(p: Any, key: str) -> Any:
        """A model or tokenizer: a local folder, or a Hub name ('org/name'), which stays relative."""
        hub = isinstance(p, str) and HUB_NAME.fullmatch(p) and not Path(p).expanduser().exists()
        return p if hub else absolute(p, key)

    for section, key, resolve in (("run", "output_dir", absolute), ("data", "prepared_dir", absolute),
                                  ("tokenizer", "path", folder_or_hub), ("model", "init_from", folder_or_hub),
                                  ("zero", "nvme_path", absolute)):
        if isinstance(raw.get(section), dict) and raw[section].get(key) is not None:
            raw[section][key] = resolve(raw[section][key], f"{section}.{key}")

    def source(s: Any, key: str) -> Any:
        if isinstance(s, dict):
            return {**s, "path": absolute(s["path"], f"{key}.path")} if s.get("path") is not None else s
        return absolute(s, key)

    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("sources"), list):
            data["sources"] = [source(s, f"data.sources.{i}") for i, s in enumerate(data["sources"])]
        for split in ("validation", "test"):
            if data.get(split) is not None:
                data[split] = source(data[split], f"data.{split}")


def _task_defaults(raw: dict) -> None:
    """What the task fills in before validation (a classifier reads text with its model's own tokenizer)."""
    from trainer.tasks import TASKS

    model = raw.get("model")
    task = TASKS.get(model.get("task", "causal_lm")) if isinstance(model, dict) else None
    if task is not None:
        task.fill_defaults(raw)


# pydantic's wording where a config user needs other words
_MESSAGES = {"extra_forbidden": "unknown key", "model_type": "expected a section (a mapping of keys)",
             "missing": "required key is missing"}


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "config"
    message = _MESSAGES.get(first["type"], first["msg"][0].lower() + first["msg"][1:])
    value = "" if first["type"] == "missing" else f" (got {short(first['input'])})"
    more = error.error_count() - 1
    return f"{loc}: {message}{value}" + (f" [and {more} more problem(s)]" if more else "")


def _check_combinations(cfg: Config, cuda_available: bool | None) -> None:
    from trainer.engine.limits import check_limits
    from trainer.tasks import task_of

    check_limits(cfg, cuda_available)  # first: a tensor x sequence layout is not one to divide by
    _check_layout(cfg)
    t = cfg.train
    if cfg.optim.warmup_steps > t.max_steps:
        raise ConfigError(f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.max_steps ({t.max_steps})")
    _check_folders(cfg)
    if cfg.eval.early_stopping and cfg.eval.best_metric is None:
        raise ConfigError("eval.early_stopping: needs eval.best_metric, the metric whose improvement it waits for")
    if cfg.data.mode == "streaming":
        _check_streaming(cfg)
    task_of(cfg).check_config(cfg)
    _check_model_fields(cfg.model)
    if cfg.model.lora is not None:
        from trainer.model.lora import check_lora

        check_lora(cfg, cuda_available)
    _check_trackers(cfg.metrics)


def _check_trackers(metrics: MetricsSection) -> None:
    """The trackers listed are installed (an optional extra) and MLflow knows its server."""
    for name in metrics.trackers:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"metrics.trackers: {name} is not installed (pip install 'zerotrain[trackers]')")
    if "mlflow" in metrics.trackers and not (metrics.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError("metrics.mlflow.tracking_uri: needed with the mlflow tracker (or MLFLOW_TRACKING_URI "
                          "in the environment), e.g. http://mlflow.example.org:5000")


def _check_layout(cfg: Config) -> None:
    """The parallel degrees divide the world (and the sequence), and the global batch the data-parallel ranks."""
    layout, t = cfg.layout, cfg.train
    for name, degree in (("sequence", layout.sequence), ("tensor", layout.tensor), ("expert", layout.expert)):
        if layout.world % degree:
            raise ConfigError(f"parallel.{name}: {degree} does not divide the world size ({layout.world})")
    if cfg.data.seq_len % layout.sequence:
        raise ConfigError(f"parallel.sequence: {layout.sequence} does not divide data.seq_len ({cfg.data.seq_len})")
    if t.global_batch_size % (t.micro_batch_size * layout.data_world):
        degree = "world size" if layout.model_parallel == 1 else \
            "data-parallel degree (world / parallel.sequence / parallel.tensor)"
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x {degree} ({layout.data_world})"
        )


def _check_folders(cfg: Config) -> None:
    """The run's folder and the prepared data's are apart: a run would write among the shards, or a prepare
    among a run's checkpoints."""
    run, prepared = cfg.run_dir.resolve(), cfg.data.prepared_dir.resolve()
    if run == prepared or prepared in run.parents:
        raise ConfigError(f"run.output_dir: {cfg.run_dir} is inside data.prepared_dir ({cfg.data.prepared_dir}); "
                          "keep runs and prepared data in separate folders")
    if run in prepared.parents:
        raise ConfigError(f"data.prepared_dir: {cfg.data.prepared_dir} is inside run.output_dir ({cfg.run_dir}); "
                          "keep runs and prepared data in separate folders")


def _check_streaming(cfg: Config) -> None:
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: streaming mode trains no tokenizer; give an existing tokenizer folder")
    source = cfg.data.sources[0]
    if len(cfg.data.sources) > 1 or source.path is None:
        raise ConfigError("data.sources: streaming mode reads one source of local files (no mixture, no Hub); "
                          "prepare the data for mixtures")


# read by transformers' models where set, though their config classes declare no field (Qwen3-MoE's head_dim)
READ_IF_SET = ("head_dim",)
# transformers' config fields of a mixture of experts' routing
ROUTER_FIELDS = ("router_aux_loss_coef", "num_experts_per_tok", "num_experts", "num_local_experts",
                 "output_router_logits")


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
        if not hasattr(defaults, key) and key not in READ_IF_SET:
            if key in ROUTER_FIELDS:
                raise ConfigError(f"model.config.{key}: {model.type} models have no router (they are dense, not a "
                                  "mixture of experts)")
            raise ConfigError(f"model.config.{key}: not a field of {type(defaults).__name__}")
