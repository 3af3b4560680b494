"""Data layer: source files -> tokenizer + token shards (prepare), then packed samples in a global, resumable order;
labelled rows -> label ids and padded token arrays for classification. Also the file primitives (durable writes,
checksums, fingerprints) and the user-error base that every layer shares."""
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.dataset import PackedDataset, packed_sources, stack_numpy
from data_pipeline.errors import DataError, UserError
from data_pipeline.labelled import LabelledData, LabelledSplit, prepare_labelled
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import prepare
from data_pipeline.record import DataFile, PreparedRecord
from data_pipeline.sampler import GlobalBatchSampler, GlobalOrder, eval_batches
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe

__all__ = [
    "DataConfig",
    "DataError",
    "DataFile",
    "GlobalBatchSampler",
    "GlobalOrder",
    "LabelledData",
    "LabelledSplit",
    "Manifest",
    "PackedDataset",
    "PreparedRecord",
    "SourceConfig",
    "TokenizerConfig",
    "UserError",
    "eval_batches",
    "packed_sources",
    "load_tokenizer",
    "prepare",
    "prepare_labelled",
    "stack_numpy",
    "tokenizer_fingerprint",
    "train_bpe",
]
