"""What a run learns: one module per task, each a `Task`, chosen by `model.task` from `TASKS`.

A task provides the transformers Auto class of its models, what `zerotrain prepare` writes and how the
prepared data opens (as one of trainer/data.py's data objects), its model's config from the data, the meta
tensors a pre-flight runs the model on, the loss of a micro-batch, the validation, its config checks and what
an export adds. The loop, the engine, the checkpoints and the launcher are the same for every task. A new task
is a module with a `Task` subclass, registered in TASKS below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig, PreTrainedModel

if TYPE_CHECKING:
    from trainer.config import Config, ModelSection
    from trainer.data import TrainingData
    from trainer.parallel.distributed import Rank
    from trainer.parallel.sequence import SequenceShard


class Task:
    name: str
    auto_model: type  # the transformers Auto class that builds and loads the task's models
    metrics: tuple[str, ...] = ("val/loss",)  # what eval.best_metric may name
    fresh_head: bool = False  # init_from a model with a head of another size replaces the head
    reads_model_tokenizer: bool = False  # tokenizes with model.init_from's tokenizer unless tokenizer.path is set

    def fill_defaults(self, raw: dict) -> None:
        """Before validation: what the task fills into the raw config."""
        model, tokenizer = raw.get("model"), raw.setdefault("tokenizer", {})
        if self.reads_model_tokenizer and isinstance(model, dict) and model.get("init_from") and \
                isinstance(tokenizer, dict) and tokenizer.get("path") is None:
            tokenizer["path"] = model["init_from"]

    def check_config(self, cfg: Config) -> None:
        """One-line ConfigErrors for settings the task cannot train with (no files read)."""

    def prepare(self, cfg: Config, part: tuple[int, int]) -> None:
        """`zerotrain prepare`: the data the task trains on, from cfg.data's sources."""
        raise NotImplementedError

    def open_data(self, cfg: Config) -> TrainingData:
        """The prepared (or streamed) data; a one-line DataError if it is not there."""
        raise NotImplementedError

    def model_config(self, section: ModelSection, vocab_size: int, data: TrainingData | None = None) \
            -> PretrainedConfig:
        """The model's transformers config for the data (None: a plan's stand-in, without data)."""
        from trainer.model.build import model_config

        return model_config(section, vocab_size)

    def check_data(self, cfg: Config, data: TrainingData) -> None:
        """Pre-flight: the data fits the run (e.g. enough of it for the validation asked for)."""

    def check_model(self, cfg: Config, config: PretrainedConfig) -> None:
        """Pre-flight: the model can do what the run asks of it."""

    def meta_inputs(self, micro_batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """A micro-batch's model inputs as meta tensors (the pre-flight runs the model on them)."""
        return {"input_ids": torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")}

    def loss(self, cfg: Config, data: TrainingData, shard: SequenceShard | None) -> Callable:
        """The loss of a micro-batch: `loss(model, batch)`."""
        raise NotImplementedError

    def validation(self, cfg: Config, data: TrainingData, rank: Rank, loss: Callable):
        """An object with `run(engine) -> metrics` (and `tests`, `test(engine)`), or None without held-out data."""
        return None

    def finish_export(self, model: PreTrainedModel, tokenizer) -> None:
        """What an exported model needs besides its weights and config."""


# The registry. Imported after Task, which the task modules subclass.
from trainer.tasks.causal_lm import CausalLM  # noqa: E402
from trainer.tasks.classification import Classification  # noqa: E402
from trainer.tasks.sft import SFT  # noqa: E402

TASKS: dict[str, Task] = {task.name: task for task in (CausalLM(), Classification(), SFT())}


def task_of(cfg: Config) -> Task:
    return TASKS[cfg.model.task]
