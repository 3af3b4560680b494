"""The data one rank trains on: prepared shards in the global order, a stream (`data.mode`), or labelled
examples (`model.task: classification`).

`corpus()` tells the model and the checkpoints what they need to know of the data (vocabulary, tokenizer,
fingerprint, labels) in any mode; `train_batches()` gives the rank's micro-batches.
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data_pipeline import GlobalBatchSampler, GlobalOrder, LabelledData, Manifest, load_tokenizer, packed_sources, \
    tokenizer_fingerprint
from data_pipeline.sources import source_units
from data_pipeline.streaming import StreamingPackedDataset
from trainer.config import Config
from trainer.distributed import die_with_parent


@dataclass(frozen=True)
class Corpus:
    vocab_size: int
    tokenizer_dir: Path
    fingerprint: str  # identity of the token stream: a checkpoint is resumed on the same one only
    manifest: Manifest | None  # prepared pretraining data; None when streaming or classifying
    labelled: LabelledData | None = None  # classification: the prepared splits and their label names
    pad_token_id: int | None = None


def corpus(cfg: Config) -> Corpus:
    if cfg.model.task == "classification":
        labelled = LabelledData.load(cfg.data.prepared_dir)
        tokenizer = load_tokenizer(labelled.tokenizer_dir, require_eos=False)
        return Corpus(len(tokenizer), labelled.tokenizer_dir, labelled.fingerprint, None, labelled,
                      tokenizer.pad_token_id)
    if cfg.data.mode == "prepared":
        manifest = Manifest.load(cfg.data.prepared_dir)
        return Corpus(manifest.vocab_size, manifest.tokenizer_dir, manifest.fingerprint, manifest)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    files = [u.__dict__ for u in source_units(cfg.data.sources[0])]
    identity = repr((files, tokenizer_fingerprint(tokenizer), cfg.data.text_field_of(cfg.data.sources[0])))
    return Corpus(len(tokenizer), cfg.tokenizer.path, hashlib.sha256(identity.encode()).hexdigest(), None)


@dataclass
class TrainBatches:
    iterator: object  # this rank's micro-batches
    order: GlobalOrder | None  # prepared mode: the global order (it knows the realised mixture)
    stream: StreamingPackedDataset | None  # streaming mode: its per-rank state goes into checkpoints


def train_batches(cfg: Config, data: Corpus, rank, consumed_samples: int, stream_state: dict | None) -> TrainBatches:
    t = cfg.train
    if data.labelled is not None:
        examples = data.labelled.split("train")
        return _ordered(cfg, examples, GlobalOrder([len(examples)], [1.0], cfg.run.seed), rank, consumed_samples)
    if data.manifest is None:
        source = cfg.data.sources[0]
        stream = StreamingPackedDataset([Path(u.location) for u in source_units(source)], cfg.data.text_field_of(source),
                                        data.tokenizer_dir, cfg.data.seq_len, rank.rank, rank.world_size, cfg.run.seed)
        if stream_state is not None:
            stream.load_state_dict(stream_state)
        # No workers: a worker would read ahead of what was trained on, and the stream's state must not.
        return TrainBatches(iter(DataLoader(stream, batch_size=t.micro_batch_size, num_workers=0)), None, stream)
    dataset = packed_sources(data.manifest, "train", cfg.data.seq_len)
    order = GlobalOrder([len(d) for d in dataset.datasets], data.manifest.weights, cfg.run.seed)
    return _ordered(cfg, dataset, order, rank, consumed_samples)


def _ordered(cfg: Config, dataset, order: GlobalOrder, rank, consumed_samples: int) -> TrainBatches:
    """Micro-batches of `dataset` in the global order, from `consumed_samples` on."""
    t = cfg.train
    sampler = GlobalBatchSampler(order, t.global_batch_size, t.micro_batch_size, rank.rank, rank.world_size,
                                 consumed_samples)
    # Its own generator: starting the workers must not draw from the global RNG, whose state a resumed run
    # restores (dropout would then differ from the uninterrupted run's).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=rank.device.type == "cuda", worker_init_fn=_init_worker,
                        generator=torch.Generator().manual_seed(cfg.run.seed))
    return TrainBatches(iter(loader), order, None)


def to_device(batch, device: torch.device):
    """A token tensor (pretraining) or a dict of tensors (classification) on the rank's device."""
    if isinstance(batch, dict):
        return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
    return batch.to(device, non_blocking=True)


def _init_worker(worker_id: int) -> None:
    """A stop signal reaches the rank's whole process group; the rank decides when to stop, and its loader
    workers must live on to serve the steps up to the save - but not past the rank's death."""
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class Mixture:
    """The realised share of each source in the samples consumed so far (logged to check the weights)."""

    def __init__(self, sources: list[str], order: GlobalOrder):
        self.sources, self.order = sources, order

    def fractions(self, consumed_samples: int) -> dict[str, float]:
        counts = self.order.counts(consumed_samples)
        return {f"data/{s}_fraction": float(c) / consumed_samples for s, c in zip(self.sources, counts)}
