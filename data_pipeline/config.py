"""Typed `tokenizer:` and `data:` config sections. Shapes and ranges only: files are checked by prepare."""
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    path: Path | None = None  # an existing HF tokenizer folder to use instead of training one
    vocab_size: int = Field(8192, ge=256, le=1_000_000)  # byte-level BPE trained on the train split
    train_sample_bytes: int = Field(64 * 2**20, gt=0)  # train the BPE on at most this much text


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    sources: list[str] = Field(min_length=1)  # files or globs: .txt, .json, .jsonl, .parquet, .csv
    text_field: str = "text"  # column holding the text in json/jsonl/parquet/csv sources
    prepared_dir: Path  # where tokenizer, shards and manifest.json go
    seq_len: int = Field(ge=8)
    validation_fraction: float = Field(0.05, gt=0, lt=0.5)  # of documents, chosen by hashing their key
    shard_tokens: int = Field(128 * 2**20, ge=1024)  # tokens per shard file (256 MiB at uint16)
    num_workers: int = Field(1, ge=0)  # DataLoader worker processes per rank
