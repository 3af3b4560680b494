"""Validation on held-out data, computed on all ranks: mean next-token loss per source (pretraining), or
loss, accuracy, macro-F1 and the confusion matrix of a split (classification)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import default_collate

from data_pipeline import LabelledData, Manifest, PackedDataset, eval_batches
from trainer import distributed
from trainer.config import ConfigError


def validation_batch_counts(manifest: Manifest, batches: int, micro_batch_size: int, seq_len: int,
                            world_size: int) -> dict[str, int]:
    """Validation micro-batches per source, over all ranks: at most `batches` (eval.batches), and a multiple of
    the world size, since a ZeRO-3 forward is a collective and every rank must run as many."""
    available = {source: max(0, (manifest.num_tokens("validation", source) - 1) // seq_len) // micro_batch_size
                 for source in manifest.sources}
    counts = {source: min(batches, n) // world_size * world_size for source, n in available.items()}
    if not any(counts.values()):
        if max(available.values()) >= world_size:  # the split is big enough: too few batches were asked for
            raise ConfigError(f"eval.batches: {batches} validation micro-batches cannot be shared by the {world_size} "
                              f"ranks (each must run as many); raise it to at least {world_size}")
        raise ConfigError(f"data.validation_fraction: the validation split holds {max(available.values())} "
                          f"micro-batch(es) of {micro_batch_size} x {seq_len} tokens, fewer than the {world_size} "
                          "ranks; raise it (and prepare again), or lower train.micro_batch_size or data.seq_len")
    return {source: count for source, count in counts.items() if count}


class Validation:
    """Over the first `eval.batches` validation micro-batches of each source. With several sources, the overall
    loss weights them as the training mixture does. Pretraining data has no test split."""

    tests = False

    def __init__(self, manifest: Manifest, counts: dict[str, int], micro_batch_size: int, seq_len: int,
                 rank: distributed.Rank, loss: Callable):
        self.sets, self.loss = {}, loss
        for source, count in counts.items():
            dataset = PackedDataset(manifest.store("validation", source), seq_len)
            self.sets[source] = (dataset, eval_batches(len(dataset), micro_batch_size, rank.data_rank, rank.data_world,
                                                       count))
        weights = dict(zip(manifest.sources, manifest.weights))
        self.weights = {source: weights[source] for source in self.sets}
        self.device = rank.device

    @torch.no_grad()
    def run(self, engine) -> dict[str, float]:
        """val/loss and val/ppl, and per source when there are several."""
        engine.eval()
        means = [sum(self.loss(engine, torch.stack([dataset[i] for i in idx]).to(self.device)).item()
                     for idx in batches) / len(batches) for dataset, batches in self.sets.values()]
        engine.train()
        losses = dict(zip(self.sets, distributed.all_mean(means, self.device)))
        overall = sum(self.weights[s] * loss for s, loss in losses.items()) / sum(self.weights.values())
        per_source = {f"val/{s}/loss": loss for s, loss in losses.items()} if len(losses) > 1 else {}
        return {"val/loss": overall, "val/ppl": math.exp(min(overall, 50)), **per_source}


class ClassifierValidation:
    """Every example of a split, in micro-batches dealt round-robin to the ranks. A ZeRO-3 forward is a
    collective, so every rank runs as many: the last rounds are filled with example 0, weighted 0."""

    tests = True  # a final test of the best weights

    def __init__(self, labelled: LabelledData, micro_batch_size: int, rank: distributed.Rank):
        self.labelled, self.rank, self.micro_batch_size = labelled, rank, micro_batch_size

    def run(self, engine) -> dict[str, float]:
        return self._scores(engine, "validation")[0]

    def test(self, engine) -> tuple[dict, str]:
        """The scores on the test split (the validation split if there is none), with the confusion matrix in
        the results and as a table."""
        split = "test" if self.labelled.examples("test") else "validation"
        results, confusion = self._scores(engine, split)
        prefix = next(iter(results)).split("/")[0]
        return {**results, f"{prefix}/confusion_matrix": confusion.int().tolist()}, self._table(confusion)

    @torch.no_grad()
    def _scores(self, engine, split: str) -> tuple[dict[str, float], torch.Tensor]:
        examples = self.labelled.split(split)
        k = len(self.labelled.labels)
        confusion = torch.zeros(k, k, dtype=torch.float64, device=self.rank.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.rank.device)
        engine.eval()
        for indices in self._batches(len(examples)):
            batch = distributed.to_device(default_collate([examples[max(i, 0)] for i in indices]), self.rank.device)
            real = torch.tensor([i >= 0 for i in indices], device=self.rank.device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            loss_sum += (F.cross_entropy(logits, labels, reduction="none") * real).sum()
            confusion.index_put_((labels[real], logits.argmax(-1)[real]), real[real].double(), accumulate=True)
        engine.train()
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
