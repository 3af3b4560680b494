"""Validation: mean next-token loss on the held-out split of each source, computed on all ranks."""

from __future__ import annotations

import torch

from data_pipeline import Manifest, PackedDataset, eval_batches
from trainer import distributed
from trainer.config import Config, ConfigError
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
    def run(self, engine) -> tuple[float, dict[str, float]]:
        engine.eval()
        means = [sum(lm_loss(engine, torch.stack([dataset[i] for i in idx]).to(self.device)).item()
                     for idx in batches) / len(batches) for dataset, batches in self.sets.values()]
        engine.train()
        losses = dict(zip(self.sets, distributed.all_mean(means, self.device)))
        overall = sum(self.weights[s] * loss for s, loss in losses.items()) / sum(self.weights.values())
        per_source = {f"val/{s}/loss": loss for s, loss in losses.items()} if len(losses) > 1 else {}
        return overall, per_source
