"""Data layer: source files -> tokenizer + token shards (prepare), then packed samples in a global, resumable order;
labelled rows -> label ids and padded token arrays for classification. Also the file primitives (durable writes,
checksums, fingerprints) and the user-error base that every layer shares.

The names below are imported from their modules on first use: reading a config or refusing a flag needs none of
torch, transformers or datasets, which the readers and writers import. (`prepare`, the function, is imported from
`data_pipeline.prepare`: the package's attribute of that name is its module.)
"""

from importlib import import_module

_HOMES = {
    "ChatConfig": "config", "DataConfig": "config", "SourceConfig": "config", "TokenizerConfig": "config",
    "PackedDataset": "dataset", "packed_sources": "dataset", "stack_numpy": "dataset",
    "DataError": "errors", "UserError": "errors",
    "ArraySplit": "arrays", "ChatData": "conversations", "prepare_chat": "conversations",
    "LabelledData": "labelled", "prepare_labelled": "labelled",
    "Manifest": "manifest", "DataFile": "record", "PreparedRecord": "record",
    "GlobalBatchSampler": "sampler", "GlobalOrder": "sampler", "eval_batches": "sampler",
    "load_tokenizer": "tokenizer", "tokenizer_fingerprint": "tokenizer", "train_bpe": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    return getattr(import_module(f"data_pipeline.{_HOMES[name]}"), name)
