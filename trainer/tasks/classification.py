"""Text classification: a label per text, a linear head on a pretrained encoder's pooled output (the seed's BERT
fine-tuning; decoder models classify from their last token), cross-entropy on the labels.

Data: labelled rows prepared by `zerotrain prepare` (data_pipeline.labelled: label ids and padded token arrays,
with the model's own tokenizer). Validation: loss, accuracy, macro-F1 and the confusion matrix of the whole
validation split; the final test scores the best checkpoint's weights on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import default_collate
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from data_pipeline import LabelledData, prepare_labelled
from trainer.config import Config, ConfigError, ModelSection
from trainer.data import LabelledExamples, TrainingData
from trainer.parallel.distributed import Rank, to_device
from trainer.tasks import Task

# a plan has no data: a head of two labels stands in (labels x hidden, nothing beside the encoder)
STAND_IN_LABELS = ["0", "1"]


class Classification(Task):
    name = "classification"
    auto_model = AutoModelForSequenceClassification
    metrics = ("val/loss", "val/accuracy", "val/macro_f1")
    fresh_head = True  # fine-tuning a fine-tuned classifier: a head of another label count is replaced
    reads_model_tokenizer = True

    def check_config(self, cfg: Config) -> None:
        e = cfg.eval
        if e.best_metric not in (None, *self.metrics):
            raise ConfigError("eval.best_metric: val/ppl is a language-model metric; use val/loss, val/accuracy "
                              "or val/macro_f1 for classification")
        if cfg.data.mode == "streaming":
            raise ConfigError("data.mode: classification reads prepared labelled data; use data.mode: prepared")
        if cfg.data.document_masking:
            raise ConfigError("data.document_masking: applies to packed text (model.task causal_lm); a "
                              "classification example is one text already")
        if cfg.tokenizer.path is None:
            raise ConfigError("tokenizer.path: classification tokenizes with the model's own tokenizer; set "
                              "model.init_from (its tokenizer is used) or tokenizer.path")
        if cfg.parallel.sequence > 1:
            raise ConfigError("parallel.sequence: splits the sequences of packed text (model.task causal_lm); a "
                              "classification example is short and attends both ways")
        if cfg.parallel.tensor > 1:
            raise ConfigError("parallel.tensor: splits decoder language models (model.task causal_lm); a "
                              "classification encoder is small enough for data parallelism")

    def prepare(self, cfg: Config, part: tuple[int, int]) -> None:
        prepare_labelled(cfg.data, cfg.tokenizer.path)

    def open_data(self, cfg: Config) -> TrainingData:
        return LabelledExamples(LabelledData.load(cfg.data.prepared_dir))

    def model_config(self, section: ModelSection, vocab_size: int, data: TrainingData | None = None) \
            -> PretrainedConfig:
        """With the label names (saved with the model: an export knows what its outputs mean)."""
        config = super().model_config(section, vocab_size)
        labels = data.labels if data is not None else STAND_IN_LABELS
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        if getattr(config, "pad_token_id", None) is None and data is not None:
            config.pad_token_id = data.pad_token_id  # decoder models classify from the last token before padding
        return config

    def meta_inputs(self, micro_batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
        return {"input_ids": ids, "attention_mask": ids}

    def loss(self, cfg: Config, data: TrainingData, shard) -> Callable:
        return classification_loss

    def validation(self, cfg: Config, data: TrainingData, rank: Rank, loss: Callable):
        return ClassifierValidation(data.labelled, cfg.train.micro_batch_size, rank)


def classification_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the head's logits against the labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"])


class ClassifierValidation:
    """Every example of a split, in micro-batches dealt round-robin to the ranks. A ZeRO-3 forward is a
    collective, so every rank runs as many: the last rounds are filled with example 0, weighted 0."""

    tests = True  # a final test of the best weights

    def __init__(self, labelled: LabelledData, micro_batch_size: int, rank: Rank):
        self.labelled, self.rank, self.micro_batch_size = labelled, rank, micro_batch_size

    def run(self, engine) -> dict[str, float]:
        return self._scores(engine, "validation")[0]

    def test(self, engine) -> tuple[dict, str]:
        """The scores on the test split (the validation split if there is none), with the confusion matrix in
        the results and as a table."""
        split = "test" if self.labelled.rows("test") else "validation"
        results, confusion = self._scores(engine, split)
        prefix = next(iter(results)).split("/")[0]
        return {**results, f"{prefix}/confusion_matrix": confusion.int().tolist()}, self._table(confusion)

    def _scores(self, engine, split: str) -> tuple[dict[str, float], torch.Tensor]:
        examples = self.labelled.split(split)
        k = len(self.labelled.labels)
        confusion = torch.zeros(k, k, dtype=torch.float64, device=self.rank.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.rank.device)
        with engine.evaluating():
            for indices in self._batches(len(examples)):
                batch = to_device(default_collate([examples[max(i, 0)] for i in indices]), self.rank.device)
                real = torch.tensor([i >= 0 for i in indices], device=self.rank.device)
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                labels = batch["labels"]
                loss_sum += (F.cross_entropy(logits, labels, reduction="none") * real).sum()
                confusion.index_put_((labels[real], logits.argmax(-1)[real]), real[real].double(), accumulate=True)
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
        prefix = {"validation": "val", "test": "test"}[split]
        results = scores(confusion.cpu(), float(loss_sum) / len(examples))
        return {f"{prefix}/{name}": value for name, value in results.items()}, confusion.cpu()

    def _batches(self, n: int) -> list[list[int]]:
        """This rank's micro-batches of example indices; -1 marks a filler."""
        per_round = self.micro_batch_size * self.rank.world_size
        padded = math.ceil(n / per_round) * per_round
        indices = list(range(n)) + [-1] * (padded - n)
        batches = [indices[i:i + self.micro_batch_size] for i in range(0, padded, self.micro_batch_size)]
        return batches[self.rank.rank::self.rank.world_size]

    def _table(self, confusion: torch.Tensor) -> str:
        """A confusion matrix as a table: a row per true label, a column per prediction."""
        labels = self.labelled.labels
        width = max(9, *(len(label) for label in labels))
        lines = [f"{'true/pred':>{width}} " + " ".join(f"{label:>{width}}" for label in labels)]
        for label, row in zip(labels, confusion.tolist()):
            lines.append(f"{label:>{width}} " + " ".join(f"{int(n):>{width}}" for n in row))
        return "\n".join(lines)


def scores(confusion: torch.Tensor, loss: float) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (the unweighted mean of the labels' F1: a rare label counts as much as a
    common one) from a confusion matrix."""
    hits = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    f1 = torch.where(predicted + actual > 0, 2 * hits / (predicted + actual).clamp(min=1), torch.zeros_like(hits))
    return {"loss": loss, "accuracy": float(hits.sum() / confusion.sum()), "macro_f1": float(f1.mean())}
