"""Token shards on disk: a writer that cuts a token stream into fixed-size files, and a lazy memory-mapped reader.

A shard `{prefix}_{i:05d}.bin` is a raw little-endian token array, each document ending in eos; documents run
across shard boundaries, and the manifest counts those that start in each shard.
"""
import hashlib
import mmap
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.files import write_durable
from data_pipeline.record import DataFile, check_size


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 65535 else "<u4")


class ShardWriter:
    def __init__(self, out_dir: Path, prefix: str, dtype, shard_tokens: int):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.buf = np.empty(shard_tokens, np.dtype(dtype).newbyteorder("<"))
        self.fill = 0
        self.docs = 0  # documents that start in the shard being filled
        self.records: list[dict] = []

    def add(self, token_ids) -> None:
        """Append one document, eos included."""
        ids = np.asarray(token_ids, dtype=self.buf.dtype)
        self.docs += 1
        while len(ids):
            n = min(len(ids), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = ids[:n]
            self.fill, ids = self.fill + n, ids[n:]
            if self.fill == len(self.buf):
                self._flush()

    def close(self) -> list[dict]:
        if self.fill:
            self._flush()
        return self.records

    def _flush(self) -> None:
        tokens = self.buf[: self.fill]
        name = f"{self.prefix}_{len(self.records):05d}"
        write_durable(self.out_dir / f"{name}.bin", tokens.tofile)
        self.records.append({
            "file": f"{name}.bin",
            "num_tokens": self.fill,
            "num_docs": self.docs,
            "sha256": hashlib.sha256(tokens).hexdigest(),
            "bytes": tokens.nbytes,
        })
        self.fill, self.docs = 0, 0


class TokenStore:
    """All shards of one split as one token array. Shards are mapped on first use: a DataLoader worker
    touches few of them, and pickling (to send the store to workers) carries no open maps."""

    def __init__(self, prepared_dir: Path, shard_records: list[dict], dtype, name: str = "tokens",
                 vocab_size: int | None = None):
        self.dir, self.records, self.name, self.vocab_size = Path(prepared_dir), list(shard_records), name, vocab_size
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.offsets = np.cumsum([0] + [r["num_tokens"] for r in self.records])  # offsets[i]: first token of shard i
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"{self.name}: tokens [{start}, {stop}) outside [0, {len(self)})")
        out = np.empty(stop - start, self.dtype)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            end = min(stop, int(self.offsets[shard + 1]))
            lo = pos - int(self.offsets[shard])
            out[pos - start : end - start] = self._shard(shard)[lo : lo + end - pos]
            if self.vocab_size and end > pos and out[pos - start : end - start].max() >= self.vocab_size:
                # bytes changed after prepare; their checksum is verified in the background, this comes first
                raise DataError(f"{self.dir / self.records[shard]['file']}: token id "
                                f"{int(out[pos - start : end - start].max())} outside the vocabulary "
                                f"({self.vocab_size}): the shard is corrupt; prepare the data again")
            pos, shard = end, shard + 1
        return out

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            record = self.records[i]
            path = self.dir / record["file"]
            check_size(DataFile(path, record["num_tokens"] * self.dtype.itemsize, record["sha256"]))
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # Training reads windows at random: without this hint every page fault reads ahead megabytes,
            # which drops a corpus larger than the page cache to a few MB/s.
            mapped.madvise(mmap.MADV_RANDOM)
            self._maps[i] = np.frombuffer(mapped, self.dtype)
        return self._maps[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}
