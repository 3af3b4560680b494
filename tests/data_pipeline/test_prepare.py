"""`zerotrain prepare` on real text (data_pipeline/prepare.py, sources.py, manifest.py): six Shakespeare plays,
a 512-token BPE and 50k-token shards (several chunks)."""


import json
import os
import re

import numpy as np
import pytest

from data_pipeline import (
    DataConfig, DataError, Manifest, PackedDataset, SourceConfig, TokenizerConfig, load_tokenizer, tokenizer_fingerprint
)
from data_pipeline.prepare import prepare
from plays import CORPUS, PLAYS, SHARD_TOKENS, VOCAB, data_config, documents, play_texts, shard_records


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
