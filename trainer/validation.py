"""Validation on held-out data, computed on all ranks: mean next-token loss per source (pretraining), or
loss, accuracy, macro-F1 and the confusion matrix (classification)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import default_collate

from data_pipeline import LabelledData, Manifest, PackedDataset, eval_batches
from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.data import to_device
from trainer.model import lm_loss


def validation_batch_counts(cfg: Config, manifest: Manifest) -> dict[str, int]:
    """Validation micro-batches per source, over all ranks: a multiple of the world size, since a ZeRO-3
    forward is a collective and every rank must run as many. The launcher calls this before starting ranks."""
    counts = {}
    for source in manifest.sources:
        samples = (manifest.num_tokens("validation", source) - 1) // cfg.data.seq_len
        available = max(0, samples) // cfg.train.micro_batch_size
        counts[source] = min(cfg.train.eval_batches, available) // cfg.world_size * cfg.world_size
    if not any(counts.values()):
        raise ConfigError(f"train.eval_batches: the validation split holds fewer micro-batches of "
                          f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens than the {cfg.world_size} "
                          "ranks; raise data.validation_fraction")
    return {source: count for source, count in counts.items() if count}


class Validation:
    """Over the first `train.eval_batches` validation micro-batches of each source. With several sources,
    the overall loss weights them as the training mixture does."""

    def __init__(self, cfg: Config, manifest: Manifest, rank: distributed.Rank):
        self.sets = {}
        for source, count in validation_batch_counts(cfg, manifest).items():
            dataset = PackedDataset(manifest.store("validation", source), cfg.data.seq_len)
            self.sets[source] = (dataset, eval_batches(len(dataset), cfg.train.micro_batch_size, rank.rank,
                                                       rank.world_size, count))
        weights = dict(zip(manifest.sources, manifest.weights))
        self.weights = {source: weights[source] for source in self.sets}
        self.device = rank.device

    @torch.no_grad()
    def run(self, engine) -> dict[str, float]:
        """val/loss and val/ppl, and per source when there are several."""
        engine.eval()
        means = [sum(lm_loss(engine, torch.stack([dataset[i] for i in idx]).to(self.device)).item()
                     for idx in batches) / len(batches) for dataset, batches in self.sets.values()]
        engine.train()
        losses = dict(zip(self.sets, distributed.all_mean(means, self.device)))
        overall = sum(self.weights[s] * loss for s, loss in losses.items()) / sum(self.weights.values())
        per_source = {f"val/{s}/loss": loss for s, loss in losses.items()} if len(losses) > 1 else {}
        return {"val/loss": overall, "val/ppl": math.exp(min(overall, 50)), **per_source}


class ClassifierValidation:
    """Every example of a split, in micro-batches dealt round-robin to the ranks. A ZeRO-3 forward is a
    collective, so every rank runs as many: the last rounds are filled with example 0, weighted 0."""

    def __init__(self, cfg: Config, labelled: LabelledData, rank: distributed.Rank):
        self.labelled, self.rank = labelled, rank
        self.micro_batch_size = cfg.train.micro_batch_size
        self.confusion: torch.Tensor | None = None  # of the last run: rows true label, columns predicted

    def has(self, split: str) -> bool:
        return self.labelled.info["splits"][split]["examples"] > 0

    @torch.no_grad()
    def run(self, engine, split: str = "validation") -> dict[str, float]:
        examples = self.labelled.split(split)
        k = len(self.labelled.labels)
        confusion = torch.zeros(k, k, dtype=torch.float64, device=self.rank.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.rank.device)
        engine.eval()
        for indices in self._batches(len(examples)):
            batch = to_device(default_collate([examples[max(i, 0)] for i in indices]), self.rank.device)
            real = torch.tensor([i >= 0 for i in indices], device=self.rank.device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            loss_sum += (F.cross_entropy(logits, labels, reduction="none") * real).sum()
            confusion.index_put_((labels[real], logits.argmax(-1)[real]), real[real].double(), accumulate=True)
        engine.train()
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
        self.confusion = confusion.cpu()
        prefix = {"validation": "val", "test": "test"}[split]
        return {f"{prefix}/{name}": value for name, value in scores(self.confusion, float(loss_sum) / len(examples)).items()}

    def _batches(self, n: int) -> list[list[int]]:
        """This rank's micro-batches of example indices; -1 marks a filler."""
        per_round = self.micro_batch_size * self.rank.world_size
        padded = math.ceil(n / per_round) * per_round
        indices = list(range(n)) + [-1] * (padded - n)
        batches = [indices[i:i + self.micro_batch_size] for i in range(0, padded, self.micro_batch_size)]
        return batches[self.rank.rank::self.rank.world_size]

    def confusion_text(self) -> str:
        """The last run's confusion matrix as a table: a row per true label, a column per prediction."""
        labels = self.labelled.labels
        width = max(9, *(len(label) for label in labels))
        lines = [f"{'true/pred':>{width}} " + " ".join(f"{label:>{width}}" for label in labels)]
        for label, row in zip(labels, self.confusion.tolist()):
            lines.append(f"{label:>{width}} " + " ".join(f"{int(n):>{width}}" for n in row))
        return "\n".join(lines)


def scores(confusion: torch.Tensor, loss: float) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (the unweighted mean of the labels' F1: a rare label counts as much as a
    common one) from a confusion matrix."""
    hits = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    f1 = torch.where(predicted + actual > 0, 2 * hits / (predicted + actual).clamp(min=1), torch.zeros_like(hits))
    return {"loss": loss, "accuracy": float(hits.sum() / confusion.sum()), "macro_f1": float(f1.mean())}
