"""Causal language modelling: next-token prediction on packed text, for pretraining and continued pretraining.

Data: packed shards prepared by `zerotrain prepare` (data_pipeline.prepare), or a stream tokenized on the fly
(data.mode: streaming). The loss is the mean next-token cross-entropy in fp32 - each document alone with
data.document_masking, this rank's slice of every sequence under parallel.sequence, a chunk of tokens at a
time where the fp32 logits would be large (train.loss_chunk_tokens). Validation: the mean loss of the first
eval.batches held-out micro-batches of each source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from data_pipeline import Manifest, PackedDataset, eval_batches
from data_pipeline.prepare import prepare
from trainer.config import Config, ConfigError
from trainer.data import PackedShards, TextStream, TrainingData
from trainer.model.shape import check_document_masking
from trainer.parallel.distributed import Rank, all_mean
from trainer.tasks import Task


class CausalLM(Task):
    name = "causal_lm"
    auto_model = AutoModelForCausalLM
    metrics = ("val/loss", "val/ppl")

    def check_config(self, cfg: Config) -> None:
        if cfg.eval.best_metric not in (None, *self.metrics):
            raise ConfigError(f"eval.best_metric: {cfg.eval.best_metric} is a classification metric; use val/loss or "
                              "val/ppl for model.task causal_lm")

    def prepare(self, cfg: Config, part: tuple[int, int]) -> None:
        prepare(cfg.data, cfg.tokenizer, part=part)

    def open_data(self, cfg: Config) -> TrainingData:
        if cfg.data.mode == "streaming":
            return TextStream(cfg)
        return PackedShards(Manifest.load(cfg.data.prepared_dir))

    def check_data(self, cfg: Config, data: TrainingData) -> None:
        if isinstance(data, PackedShards):
            validation_batch_counts(data.manifest, cfg)

    def check_model(self, cfg: Config, config: PretrainedConfig) -> None:
        if cfg.data.document_masking:
            check_document_masking(config)

    def loss(self, cfg: Config, data: TrainingData, shard) -> Callable:
        """Next-token prediction, each document on its own with data.document_masking, this rank's slice of each
        sequence with `shard`."""
        return partial(lm_loss, eos_id=data.eos_id if cfg.data.document_masking else None, shard=shard,
                       chunk=loss_chunk(cfg.rank_tokens, data.vocab_size, cfg.train.loss_chunk_tokens),
                       cross_entropy=torch.compile(fp32_cross_entropy) if cfg.train.compile else fp32_cross_entropy)

    def validation(self, cfg: Config, data: TrainingData, rank: Rank, loss: Callable):
        if not isinstance(data, PackedShards):  # a stream has no held-out split
            return None
        return Validation(data.manifest, validation_batch_counts(data.manifest, cfg), cfg.train.micro_batch_size,
                          cfg.data.seq_len, rank, loss)

    def finish_export(self, model: PreTrainedModel, tokenizer) -> None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# train.loss_chunk_tokens' default: chunks of this many bytes of fp32 logits, when the whole exceeds AUTO_CHUNKING
CHUNK_BYTES, AUTO_CHUNKING = 2**26, 2**29


def loss_chunk(tokens_per_micro_batch: int, vocab_size: int, configured: int | None) -> int | None:
    """Tokens per chunk of the causal-LM loss (train.loss_chunk_tokens), None for the whole micro-batch at once."""
    if configured is not None:
        return configured or None
    if 4 * tokens_per_micro_batch * vocab_size <= AUTO_CHUNKING:
        return None
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def fp32_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each token's cross-entropy, the logits upcast to fp32 (under train.compile: one fused kernel)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def lm_loss(model, batch: torch.Tensor, eos_id: int | None = None, shard=None, chunk: int | None = None,
            cross_entropy: Callable = fp32_cross_entropy) -> torch.Tensor:
    """Next-token cross-entropy on packed samples of seq_len + 1 tokens. With `eos_id` (data.document_masking)
    each document of a sample is trained as if alone: positions restart after every eos, attention stays within
    a document and nothing is predicted from an eos (the next document's first token is not its continuation).
    With `shard` (trainer.parallel.sequence.SequenceShard) this rank runs its slice of every sequence. With
    `chunk`, the cross-entropy takes that many tokens at a time (token_losses). `cross_entropy`: the per-token
    fp32 cross-entropy to use (train.compile passes a compiled one)."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    if eos_id is None and shard is None:
        logits = model(input_ids=inputs).logits
        return token_losses(logits, labels, chunk, cross_entropy).mean()
    # transformers reads restarting position_ids as packed documents when no attention mask (and no cache) is
    # given: sdpa, eager and flex get a block-diagonal causal mask, flash-attention its variable-length kernel.
    if eos_id is None:
        positions, predicted = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs), None
    else:
        positions, predicted = document_positions(inputs, eos_id), inputs != eos_id
    count = inputs.numel() if predicted is None else predicted.sum().clamp(min=1)
    if shard is not None:  # positions and labels belong to the whole sequence: cut after they are known
        inputs, labels, positions = shard.cut(inputs), shard.cut(labels), shard.cut(positions)
        predicted = None if predicted is None else shard.cut(predicted)
    # No cache: transformers keeps documents apart where positions restart only when it makes none
    logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    losses = token_losses(logits, labels, chunk, cross_entropy)
    part = (losses if predicted is None else losses * predicted.flatten()).sum() / count
    return part if shard is None else shard.whole(part)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, chunk: int | None = None,
                 cross_entropy: Callable = fp32_cross_entropy) -> torch.Tensor:
    """Each token's cross-entropy, in fp32. With `chunk`, that many tokens at a time, each chunk checkpointed:
    backward recomputes its fp32 logits and log-softmax instead of keeping them, so only the model's own
    (16-bit) logits stay alive over the micro-batch - not their fp32 copy and log-softmax (8 B per logit)."""
    logits, labels = logits.flatten(0, 1), labels.flatten()
    if chunk is None or chunk >= len(labels):
        return cross_entropy(logits, labels)
    return torch.cat([checkpoint(cross_entropy, part, target, use_reentrant=False)
                      for part, target in zip(logits.split(chunk), labels.split(chunk))])


def document_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position within its document: 0 at a sample's first token and after every eos."""
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0], starts[:, 1:] = True, inputs[:, :-1] == eos_id
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def validation_batch_counts(manifest: Manifest, cfg: Config) -> dict[str, int]:
    """Validation micro-batches per source, over all data-parallel ranks: at most eval.batches, and a multiple of
    their number, since a ZeRO-3 forward is a collective and every rank must run as many."""
    batches, micro_batch_size, seq_len = cfg.eval.batches, cfg.train.micro_batch_size, cfg.data.seq_len
    world_size = cfg.layout.data_world
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
                 rank: Rank, loss: Callable):
        self.sets, self.loss = {}, loss
        for source, count in counts.items():
            dataset = PackedDataset(manifest.store("validation", source), seq_len)
            self.sets[source] = (dataset, eval_batches(len(dataset), micro_batch_size, rank.data_rank, rank.data_world,
                                                       count))
        weights = dict(zip(manifest.sources, manifest.weights))
        self.weights = {source: weights[source] for source in self.sets}
        self.device = rank.device

    def run(self, engine) -> dict[str, float]:
        """val/loss and val/ppl, and per source when there are several."""
        with engine.evaluating():
            means = [sum(self.loss(engine, torch.stack([dataset[i] for i in idx]).to(self.device)).item()
                         for idx in batches) / len(batches) for dataset, batches in self.sets.values()]
        losses = dict(zip(self.sets, all_mean(means, self.device)))
        overall = sum(self.weights[s] * loss for s, loss in losses.items()) / sum(self.weights.values())
        per_source = {f"val/{s}/loss": loss for s, loss in losses.items()} if len(losses) > 1 else {}
        return {"val/loss": overall, "val/ppl": math.exp(min(overall, 50)), **per_source}
