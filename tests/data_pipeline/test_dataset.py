"""Packed samples read from the prepared shards (data_pipeline/dataset.py, shards.py)."""


import itertools
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate, default_convert

from data_pipeline import DataError, GlobalBatchSampler, GlobalOrder, PackedDataset, stack_numpy
from plays import shard_records


def test_packed_dataset_samples_overlap_by_one(prepared):
    manifest, _ = prepared
    store, seq_len = manifest.store("train"), 64
    ds = PackedDataset(store, seq_len)
    assert len(ds) == (len(store) - 1) // seq_len
    a, b = ds[0], ds[1]
    assert a.shape == (seq_len + 1,) and str(a.dtype) == "torch.int64"
    assert a[-1] == b[0]
    # Sample crossing from shard 0 into shard 1 matches the raw files.
    i = int(store.offsets[1]) // seq_len
    raw = np.concatenate([np.fromfile(manifest.dir / r["file"], "<u2") for r in shard_records(manifest, "train")[:2]])
    assert ds[i].tolist() == raw[i * seq_len : (i + 1) * seq_len + 1].tolist()
    assert ds[len(ds) - 1].shape == (seq_len + 1,)
    with pytest.raises(IndexError):
        ds[len(ds)]
    val = manifest.store("validation")
    with pytest.raises(DataError, match=r"data.seq_len: the shakespeare validation split has \d+ tokens"):
        PackedDataset(val, len(val))


def test_token_store_pickles_without_its_maps(prepared):
    store = prepared[0].store("train")
    first = store.read(0, len(store))  # maps every shard
    clone = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 10_000 < first.nbytes
    assert np.array_equal(clone.read(0, len(clone)), first)


def test_dataloader_workers_read_the_sampled_samples(prepared):
    # spawn, not fork: the worker gets the dataset by pickle, as on platforms without fork. Batches stacked as
    # numpy in the worker (as the trainer's loader does), tensors again here.
    ds = PackedDataset(prepared[0].store("train"), 64)
    sampler = GlobalBatchSampler(GlobalOrder([len(ds)], [1.0], seed=0), 8, 4, rank=1, world_size=2)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=stack_numpy)
    for indices, batch in zip(sampler, itertools.islice(map(default_convert, loader), 3)):
        assert torch.equal(batch, torch.stack([ds[i] for i in indices])) and batch.dtype == torch.int64
    examples = [{"input_ids": ds[i][:8], "labels": torch.tensor(i)} for i in range(3)]  # classification's
    assert all(torch.equal(a, b) for a, b in zip(default_convert(stack_numpy(examples)).values(),
                                                 default_collate(examples).values()))
