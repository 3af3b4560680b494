"""Data layer: source files -> tokenizer + token shards (prepare), then packed samples in a global, resumable order."""
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.dataset import PackedDataset
from data_pipeline.errors import DataError
from data_pipeline.prepare import Manifest, prepare
from data_pipeline.sampler import GlobalBatchSampler, eval_batches
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe

__all__ = [
    "DataConfig",
    "DataError",
    "GlobalBatchSampler",
    "Manifest",
    "PackedDataset",
    "TokenizerConfig",
    "eval_batches",
    "load_tokenizer",
    "prepare",
    "tokenizer_fingerprint",
    "train_bpe",
]
