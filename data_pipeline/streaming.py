"""Streaming mode: tokenize and pack on the fly from a `datasets` stream, for sources too big or too fresh to prepare.

There is no prepare step, so the tokenizer must already exist (a Hugging Face tokenizer folder), and nothing
is held in memory beyond one shuffle block of documents and the packing buffer.

How a rank's samples are made, in order:
1. `datasets` reads the files as one streaming dataset and shuffles their order (seeded; `set_epoch` gives every
   epoch another order). datasets 5 also interleaves the documents of up to 10 files at a time.
2. `split_dataset_by_node` gives each rank its part. When the number of files is a multiple of the world size,
   each rank reads whole files (another set each epoch, as the file order changes). Otherwise every rank reads
   every file and keeps 1 document in `world_size`: correct, but each rank then parses the whole corpus. Either
   way the ranks' documents are disjoint and together make the epoch.
3. Documents are shuffled in blocks of `shuffle_buffer`: a block is read, permuted by a seeded generator, and
   emitted. (datasets' own rolling `shuffle(buffer_size=...)` cannot be resumed exactly: its buffer is dropped
   from `state_dict()`, so documents are lost on resume. A block can be re-read from where it started.)
4. Each document is tokenized, eos appended, and the token stream cut into windows of seq_len + 1 tokens.
   Consecutive windows share one token, as in the prepared `PackedDataset`. The stream never ends: the
   packing buffer carries over from one epoch into the next.

Resuming: `state_dict()` holds the epoch, the block (its index, and datasets' `state_dict()` where it starts),
how many of its documents are already packed, and the packing buffer's unemitted tokens. It is JSON-serializable
and per rank. Loaded on the same files, tokenizer, world size, rank, seed and shuffle_buffer, the next samples are
exactly those an uninterrupted run would have produced. It is not valid on another world size.

No DataLoader workers: a worker reads ahead of the training loop, so its position is not what was trained on.
Iterate this dataset in the training process (DataLoader num_workers=0) and call `state_dict()` between batches.
Iterating it in a worker raises.
"""
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from datasets.table import CastError

from data_pipeline.errors import DataError
from data_pipeline.sources import builder_for, stream_files, unreadable
from data_pipeline.tokenizer import load_tokenizer

# On resume datasets warns that a shuffle buffer restarts empty. Ours (buffer_size=1) is empty between examples,
# so nothing is lost, and the warning would only make an exact resume look inexact.
logging.getLogger("datasets.iterable_dataset").addFilter(
    lambda record: not record.getMessage().startswith("Loading a state dict of a shuffle buffer")
)


class DocumentStream:
    """This rank's rows of the files, epoch after epoch, shuffled in resumable blocks (steps 1-3 above): what
    the packed text windows and the chat samples (streaming_chat.py) are made from.

    The position lives in the object, like datasets' own: a new iterator continues where the last one stopped,
    so iterate with one iterator at a time. `field`: the column every row needs, named when a file lacks it."""

    def __init__(self, files: list[Path], field: str | None, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int):
        if not files:
            raise DataError("data.sources: no files to stream")
        if len({builder_for(f)[0] for f in files}) > 1:
            raise DataError(f"data.sources: streaming reads one type of file, got {sorted({f.suffix for f in files})}")
        self.files = files
        self.field = "text" if builder_for(files[0])[0] == "text" else field
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        # buffer_size=1 keeps only the file shuffle and interleaving: documents are shuffled in resumable blocks.
        self.source = stream_files([str(f) for f in files]).shuffle(seed=seed, buffer_size=1)
        self._start_epoch(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[dict]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("a streaming dataset runs in the training process (DataLoader num_workers=0): "
                               "a worker reads ahead, so its state_dict() would not match what was trained on")
        while True:
            yield from self._rows()
            self._start_epoch(self._epoch + 1)

    def state_dict(self) -> dict:
        return {**self._layout(), "epoch": self._epoch, "block": self._block, "block_start": self._block_start,
                "block_done": self._block_done}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state[key] for key in self._layout()}
        if saved != self._layout():
            raise DataError(f"streaming data state: saved for {saved}, cannot resume exactly with {self._layout()}")
        self._epoch, self._block, self._block_start = state["epoch"], state["block"], state["block_start"]
        self._block_done = state["block_done"]

    def _layout(self) -> dict:
        """What the order of documents depends on besides the files: a state is only valid under the same."""
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer}

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._block, self._block_start, self._block_done = epoch, 0, None, 0

    def _rows(self) -> Iterator[dict]:
        """The rest of this epoch's rows for this rank. The state moves before each row is handed out, so that
        between two samples it describes exactly what they were made from."""
        stream = split_dataset_by_node(self.source, self.rank, self.world_size)
        stream.set_epoch(self._epoch)
        if self._block_start is not None:
            stream.load_state_dict(self._block_start)
        rows = iter(stream)
        while block := self._read_block(rows):
            order = np.random.default_rng([self.seed, self._epoch, self._block]).permutation(len(block))
            for i in order[self._block_done :]:
                self._block_done += 1
                yield block[i]
            self._block, self._block_start, self._block_done = self._block + 1, stream.state_dict(), 0
        if self._block == 0:  # nothing read this epoch: iterating on would loop forever without a sample
            raise DataError(f"data.sources: rank {self.rank} of {self.world_size} got no document "
                            f"from the {len(self.files)} files (fewer documents than ranks?)")

    def _read_block(self, rows: Iterator[dict]) -> list[dict]:
        try:
            return list(itertools.islice(rows, self.shuffle_buffer))
        except CastError as e:  # datasets casts every file to the first file's columns
            raise (self.field and _file_without(self.files, self.field)) or DataError(
                f"data.sources: a file's columns differ from the first file's: {' '.join(str(e).split())}"
            ) from e
        except (ValueError, UnicodeError) as e:  # a file the parser cannot read
            raise unreadable([str(f) for f in self.files], e) from None


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """This rank's endless stream of packed samples: long tensors of seq_len + 1 tokens (one iterator at a time,
    as DocumentStream)."""

    def __init__(self, files: list[Path], text_field: str, tokenizer_dir: Path, seq_len: int,
                 rank: int, world_size: int, seed: int, shuffle_buffer: int = 1000):
        self.documents = DocumentStream(files, text_field, rank, world_size, seed, shuffle_buffer)
        self.files, self.text_field = files, self.documents.field
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.seq_len = seq_len
        self._tokens = np.empty(0, dtype=np.int64)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for text in map(self._text, self.documents):  # endless: the packing buffer carries over into each epoch
            ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
            self._tokens = np.concatenate([self._tokens, ids["input_ids"], [self.tokenizer.eos_token_id]])
            while len(self._tokens) > self.seq_len:
                window = torch.from_numpy(self._tokens[: self.seq_len + 1].copy())
                self._tokens = self._tokens[self.seq_len :]  # a view: O(1) however long the document
                yield window

    def state_dict(self) -> dict:
        return {**self.documents.state_dict(), "tokens": self._tokens.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state)
        self._tokens = np.array(state["tokens"], dtype=np.int64)

    def _text(self, row: dict) -> str:
        text = row.get(self.text_field)
        if not isinstance(text, str):
            where = self.files[0] if len(self.files) == 1 else f"one of the {len(self.files)} files"
            raise _file_without(self.files, self.text_field) or DataError(
                f"data.text_field: a row in {where} has no {self.text_field!r} text (it is {type(text).__name__})"
            )
        return text


def _file_without(files: list[Path], field: str) -> DataError | None:
    """The stream does not say which file a row came from: on a bad row, name the first file lacking the field."""
    for file in files:
        row = next(iter(stream_files([str(file)])), None)
        if row is not None and not isinstance(row.get(field), str):
            return DataError(f"{file}: has no {field!r} text field (data.text_field); its fields: {sorted(row)}")
    return None
