"""The data one rank trains on, one object per mode, all with the same small interface: packed shards in the
global order (`PackedShards`), a stream tokenized on the fly (`TextStream`, data.mode: streaming), labelled
examples (`LabelledExamples`), chat samples (`ChatSamples`) or a stream of them (`ChatStream`). The task opens
the one it trains on (trainer/tasks); no other caller asks which.

Each mode knows what the model needs of the data (vocabulary, labels, padding), what a checkpoint records of it
(its fingerprint), what the pre-flight checks of its files, and the rank's training batches.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, default_convert

from data_pipeline import ChatData, GlobalBatchSampler, GlobalOrder, LabelledData, Manifest, load_tokenizer, \
    packed_sources, stack_numpy, tokenizer_fingerprint
from data_pipeline.files import fingerprint
from data_pipeline.record import PreparedRecord
from trainer.config import Config
from trainer.parallel.distributed import Rank, die_with_parent


@dataclass
class Batches:
    """A rank's micro-batches, what a checkpoint must record of their position besides the consumed samples
    (streaming: this rank's stream state), and what to log about them."""

    iterator: Iterator
    state: Callable[[], dict | None] = lambda: None
    metrics: Callable[[int], dict[str, float]] = field(default=lambda consumed_samples: {})


class TrainingData:
    """The interface of every data mode."""

    vocab_size: int
    tokenizer_dir: Path
    fingerprint: str  # identity of what is trained on: a checkpoint is resumed on the same data only
    labels: list[str] | None = None
    pad_token_id: int | None = None
    record: PreparedRecord | None = None  # prepared data: its files, checked before and verified during a run
    eos_id: int | None = None  # packed text: the token that ends each document
    chat_template: str | None = None  # chat data: the template trained with, which an export keeps
    resumes_on_other_ranks = True

    def check(self) -> None:
        """Pre-flight, before any rank starts: what is cheap to check of the files."""
        if self.record is not None:
            self.record.check_sizes()

    def batches(self, cfg: Config, rank: Rank, consumed_samples: int, stream_state: dict | None) -> Batches:
        raise NotImplementedError

    def describe(self) -> list[str]:
        """Lines for the log and TensorBoard at start-up."""
        return []


class PackedShards(TrainingData):
    def __init__(self, manifest: Manifest):
        self.manifest = self.record = manifest
        self.vocab_size, self.tokenizer_dir, self.fingerprint = manifest.vocab_size, manifest.tokenizer_dir, \
            manifest.fingerprint
        self.eos_id = manifest.eos_id

    def batches(self, cfg: Config, rank: Rank, consumed_samples: int, stream_state: dict | None) -> Batches:
        dataset = packed_sources(self.manifest, "train", cfg.data.seq_len)
        order = GlobalOrder([len(d) for d in dataset.datasets], self.manifest.weights, cfg.run.seed)
        batches = Batches(_ordered(cfg, dataset, order, rank, consumed_samples))
        if len(self.manifest.sources) > 1:  # the realised share of each source, to check the mixture's weights
            batches.metrics = lambda consumed: {f"data/{s}_fraction": float(c) / consumed for s, c in
                                                zip(self.manifest.sources, order.counts(consumed))}
        return batches

    def describe(self) -> list[str]:
        return [f"{source}: {self.manifest.num_tokens('train', source):,} training tokens, weight {weight:.3g}"
                for source, weight in zip(self.manifest.sources, self.manifest.weights)]


class Stream(TrainingData):
    """The one source's local files read on the fly (data.mode: streaming): no held-out split (no validation),
    and a per-rank position, so a run resumes on as many ranks only."""

    resumes_on_other_ranks = False

    def __init__(self, cfg: Config):
        from data_pipeline.sources import source_units  # datasets: imported for streaming runs only

        self.source = cfg.data.sources[0]
        self.units = source_units(self.source)
        self.files = [Path(u.location) for u in self.units]

    def describe(self) -> list[str]:
        return [f"streaming {len(self.files)} file(s) of {self.source.name}"]


def _micro_batches(stream, cfg: Config, stream_state: dict | None) -> Iterator:
    """A stream's micro-batches, from where `stream_state` says."""
    if stream_state is not None:
        stream.load_state_dict(stream_state)
    # No workers: a worker would read ahead of what was trained on, and the stream's state must not.
    return iter(DataLoader(stream, batch_size=cfg.train.micro_batch_size, num_workers=0))


class TextStream(Stream):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.text_field = cfg.data.text_field_of(self.source)
        self.vocab_size, self.tokenizer_dir, self.eos_id = len(tokenizer), cfg.tokenizer.path, tokenizer.eos_token_id
        self.fingerprint = fingerprint([u.__dict__ for u in self.units], tokenizer_fingerprint(tokenizer),
                                       self.text_field)

    def batches(self, cfg: Config, rank: Rank, consumed_samples: int, stream_state: dict | None) -> Batches:
        from data_pipeline.streaming import StreamingPackedDataset

        stream = StreamingPackedDataset(self.files, self.text_field, self.tokenizer_dir, cfg.data.seq_len,
                                        rank.data_rank, rank.data_world, cfg.run.seed)
        return Batches(_micro_batches(stream, cfg, stream_state), state=stream.state_dict)


class LabelledExamples(TrainingData):
    def __init__(self, labelled: LabelledData):
        self.labelled = self.record = labelled
        tokenizer = load_tokenizer(labelled.tokenizer_dir, require_eos=False)
        self.vocab_size, self.tokenizer_dir, self.fingerprint = len(tokenizer), labelled.tokenizer_dir, \
            labelled.fingerprint
        self.labels, self.pad_token_id = labelled.labels, tokenizer.pad_token_id

    def batches(self, cfg: Config, rank: Rank, consumed_samples: int, stream_state: dict | None) -> Batches:
        examples = self.labelled.split("train")
        return Batches(_ordered(cfg, examples, GlobalOrder([len(examples)], [1.0], cfg.run.seed), rank,
                                consumed_samples))

    def describe(self) -> list[str]:  # class imbalance, visible before the first step
        counts = self.labelled.label_counts("train")
        return ["training examples per label: " + ", ".join(f"{label} {n}" for label, n in counts.items())]


class ChatSamples(TrainingData):
    """Each micro-batch carries `loss_tokens`: the learned tokens of its whole optimizer step (every micro-batch
    of every data-parallel rank) over the micro-batches that share them, so that summing each micro-batch's
    token losses over it, as DeepSpeed averages micro-batches and ranks, gives the step's mean over its learned
    tokens - not a mean of micro-batch means, which would weigh a token by how few share its micro-batch."""

    def __init__(self, chat: ChatData):
        self.chat = self.record = chat
        tokenizer = load_tokenizer(chat.tokenizer_dir)
        self.vocab_size, self.tokenizer_dir, self.fingerprint = len(tokenizer), chat.tokenizer_dir, chat.fingerprint
        self.eos_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def batches(self, cfg: Config, rank: Rank, consumed_samples: int, stream_state: dict | None) -> Batches:
        samples = self.chat.split("train")
        order = GlobalOrder([len(samples)], [1.0], cfg.run.seed)
        micro_batches = _ordered(cfg, samples, order, rank, consumed_samples)
        steps = _ordered_steps(micro_batches, order, self.chat.learned_tokens("train"), cfg, consumed_samples)
        return Batches(_with_step_tokens(steps, cfg))

    def describe(self) -> list[str]:
        return self.chat.describe()


class ChatStream(Stream):
    """Chat samples made on the fly (data.mode: streaming; data_pipeline.streaming_chat), each micro-batch with
    `loss_tokens` as ChatSamples'."""

    def __init__(self, cfg: Config):
        from data_pipeline.conversations import chat_fingerprint, chat_template

        super().__init__(cfg)
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.chat_template = chat_template(cfg.data, tokenizer, cfg.tokenizer.path).template
        self.vocab_size, self.tokenizer_dir = len(tokenizer), cfg.tokenizer.path
        self.eos_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.fingerprint = chat_fingerprint(cfg.data, tokenizer_fingerprint(tokenizer), self.chat_template)

    def batches(self, cfg: Config, rank: Rank, consumed_samples: int, stream_state: dict | None) -> Batches:
        from data_pipeline.streaming_chat import StreamingChatDataset

        stream = StreamingChatDataset(self.files, cfg.data, self.tokenizer_dir, rank.data_rank, rank.data_world,
                                      cfg.run.seed)
        steps = _counted_steps(_micro_batches(stream, cfg, stream_state), cfg, rank)
        return Batches(_with_step_tokens(steps, cfg), state=stream.state_dict,
                       metrics=lambda consumed: {"data/left_out_fraction": stream.left_out_fraction()})


def _ordered_steps(micro_batches: Iterator, order: GlobalOrder, learned, cfg: Config,
                   consumed_samples: int) -> Iterator[tuple[Iterator, int]]:
    """Each optimizer step's micro-batches (read as they are trained) and learned tokens, known from the global
    order before they are read: no collective."""
    step_size = cfg.train.global_batch_size
    for start in itertools.count(consumed_samples, step_size):
        yield ((next(micro_batches) for _ in range(cfg.grad_accum)),
               sum(int(learned[order.sample(k)]) for k in range(start, start + step_size)))


def _counted_steps(micro_batches: Iterator, cfg: Config, rank: Rank) -> Iterator[tuple[list[dict], int]]:
    """Each optimizer step's micro-batches and learned tokens. Each rank streams its own samples, so a step's
    learned tokens are known once every rank has read its micro-batches: they are summed over all ranks in one
    collective, in which each rank of a sequence or tensor group counts the group's (the same) samples again."""
    while True:
        step = list(itertools.islice(micro_batches, cfg.grad_accum))
        tokens = torch.tensor(sum(int((batch["labels"] >= 0).sum()) for batch in step), device=rank.device)
        dist.all_reduce(tokens)
        yield step, int(tokens) // cfg.layout.model_parallel


def _with_step_tokens(steps: Iterator[tuple[Iterator, int]], cfg: Config) -> Iterator[dict]:
    """Each step's micro-batches, each with `loss_tokens`: the step's learned tokens (all ranks') over the
    micro-batches that share them (accumulation x data-parallel ranks)."""
    shares = cfg.grad_accum * cfg.layout.data_world
    for micro_batches, tokens in steps:
        for batch in micro_batches:
            yield {**batch, "loss_tokens": torch.tensor(max(tokens, 1) / shares)}


def _ordered(cfg: Config, dataset, order: GlobalOrder, rank: Rank, consumed_samples: int) -> Iterator:
    """Micro-batches of `dataset` in the global order, from `consumed_samples` on."""
    t = cfg.train
    sampler = GlobalBatchSampler(order, t.global_batch_size, t.micro_batch_size, rank.data_rank, rank.data_world,
                                 consumed_samples)
    # Its own generator: starting the workers must not draw from the global RNG, whose state a resumed run
    # restores (dropout would then differ from the uninterrupted run's).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=stack_numpy,
                        worker_init_fn=_init_worker, generator=torch.Generator().manual_seed(cfg.run.seed))
    return map(default_convert, loader)  # tensors again, sharing the arrays' memory


def _init_worker(worker_id: int) -> None:
    """Stop signals reach the rank's whole process group; the rank decides when to stop, and its loader
    workers must live on to serve the steps up to the save - but not past the rank's death."""
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
