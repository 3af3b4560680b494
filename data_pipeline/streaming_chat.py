"""Streaming chat data (model.task sft, data.mode streaming): chat rows read as this rank's stream of the files
(streaming.DocumentStream: per-rank parts, resumable shuffled blocks, a new order each epoch), each made an
example as `zerotrain prepare` makes it (data_pipeline.chat, conversations.make_example), packed in stream order.

Packing is greedy: a conversation that does not fit the current sample ends it (padded, the padding not learned)
and starts the next; with data.packing false each conversation has a sample of its own. A sample is what a
prepared one is (conversations.lay_out): input_ids, labels, position_ids, seq_len each, positions restarting at
every conversation. Rows are left out (and counted) or refused as prepare does; the stream does not say which
file and row a row is, so a refusal looks it up in the files first.

Resuming: state_dict() is the row stream's position, the pending sample's conversations (what has been read but
not yet trained on) and the counts of rows read and left out: JSON, per rank. Loaded on the same files, settings,
tokenizer and layout (rank, world size, seed, shuffle_buffer), the next samples are exactly an uninterrupted
run's. As for packed text: no DataLoader workers, and no held-out split.
"""
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.chat import read_conversation
from data_pipeline.config import DataConfig
from data_pipeline.conversations import Example, chat_template, describe_left_out, lay_out, \
    left_out_reason, make_example, pad_id
from data_pipeline.errors import DataError
from data_pipeline.sources import stream_files
from data_pipeline.streaming import DocumentStream
from data_pipeline.tokenizer import load_tokenizer

UNNAMED = "(a streamed row)"  # where a row is, until a refusal looks it up


class StreamingChatDataset(torch.utils.data.IterableDataset):
    """This rank's endless stream of chat samples: dicts of long tensors (one iterator at a time)."""

    def __init__(self, files: list[Path], data: DataConfig, tokenizer_dir: Path, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int = 1000):
        self.rows = DocumentStream(files, None, rank, world_size, seed, shuffle_buffer)
        tokenizer = load_tokenizer(tokenizer_dir)
        self.template, self.pad, self.data = chat_template(data, tokenizer, tokenizer_dir), pad_id(tokenizer), data
        self._pending: list[Example] = []  # the sample being filled
        self._read, self._left_out, self._kept_epoch = 0, Counter(), -1  # the epoch of the latest example kept

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for row in self.rows:
            example = self._example(row)
            if example is None:
                continue
            if self._pending and not self._fits(example):
                sample, self._pending = self._sample(), [example]  # the state is the next sample's before the yield
                yield sample
            else:
                self._pending.append(example)

    def state_dict(self) -> dict:
        return {**self.rows.state_dict(), "pending": [[e.ids.tolist(), e.labels.tolist()] for e in self._pending],
                "read": self._read, "left_out": dict(self._left_out), "kept_epoch": self._kept_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)
        self._pending = [Example(np.array(ids, np.int32), np.array(labels, np.int32))
                         for ids, labels in state["pending"]]
        self._read, self._left_out, self._kept_epoch = state["read"], Counter(state["left_out"]), state["kept_epoch"]

    def left_out_fraction(self) -> float:
        """Of the rows this rank has read, the share left out."""
        return sum(self._left_out.values()) / max(self._read, 1)

    def _example(self, row: dict) -> Example | None:
        """The row's example; None if it is left out (counted). A refusal names the row."""
        self._read += 1
        try:
            example = make_example(read_conversation(row, UNNAMED, self.data.chat), self.template, self.data)
        except DataError as e:
            try:
                self._left_out[left_out_reason(e, self.data.chat)] += 1
            except DataError as refusal:
                raise DataError(str(refusal).replace(UNNAMED, _where(self.rows.files, row), 1)) from None
            if self.rows.epoch >= self._kept_epoch + 2:  # a whole epoch without an example: it would loop forever
                raise DataError(f"data.sources: none of rank {self.rows.rank}'s conversations is left to train on "
                                f"({describe_left_out(self._left_out)})") from None
            return None
        self._kept_epoch = self.rows.epoch
        return example

    def _fits(self, example: Example) -> bool:
        used = sum(len(e.ids) for e in self._pending)
        return self.data.packing and used + len(example.ids) <= self.data.seq_len

    def _sample(self) -> dict[str, torch.Tensor]:
        arrays = lay_out(self._pending, [list(range(len(self._pending)))], self.data.seq_len, self.pad)
        return {name: torch.from_numpy(array[0].astype(np.int64)) for name, array in arrays.items()}


def _where(files: list[Path], row: dict) -> str:
    """Which file and row `row` is: the first equal row of the files (as prepare numbers them)."""
    for file in files:
        for i, candidate in enumerate(stream_files([str(file)])):
            if candidate == row:
                return f"{file}: row {i}"
    return f"a row of one of the {len(files)} files"
