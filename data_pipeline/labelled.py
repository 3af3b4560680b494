"""Labelled text for classification: rows -> label ids and fixed-length token arrays per split, saved once.

`prepare_labelled` reads the text and label columns of the train source (and of given validation/test
sources), maps label names to ids (the map is saved, and goes into the model's config), holds out
validation/test rows by hashing their text when those splits are not given (so a duplicate text never lands
in two splits), tokenizes with the model's own tokenizer, padded and cut to seq_len (data.truncation), and
writes each split as .npy arrays plus labelled.json (written last: its presence means the data is complete).
`LabelledData.split` serves one split's examples as tensors; `GlobalOrder` orders them like packed samples.
"""
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.arrays import ArrayRecord, write_arrays
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.files import fingerprint, write_durable
from data_pipeline.sources import iter_rows, source_units
from data_pipeline.splits import split_of
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

SPLITS = ("train", "validation", "test")
ARRAYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    where: str  # file and row, for error messages


def prepare_labelled(data: DataConfig, tokenizer_dir: Path, log=print) -> "LabelledData":
    out = Path(data.prepared_dir)
    tokenizer = load_tokenizer(tokenizer_dir, require_eos=False)
    inputs_fingerprint = _inputs_fingerprint(data, tokenizer_fingerprint(tokenizer))
    if (out / LabelledData.FILE).is_file():
        existing = LabelledData.load(out)
        if existing.fingerprint != inputs_fingerprint:
            raise DataError(f"data.prepared_dir: {out} holds labelled data prepared from other inputs or another "
                            "tokenizer; choose another prepared_dir or delete it")
        log(f"labelled data in {out} is up to date")
        return existing
    splits = _split(data)
    labels = _label_names(data, splits)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": LabelledData.FORMAT, "inputs_fingerprint": inputs_fingerprint, "labels": labels,
            "seq_len": data.seq_len, "splits": {}}
    for split, examples in splits.items():
        info["splits"][split] = _write_split(out / split, examples, labels, tokenizer, data.seq_len,
                                               data.truncation)
        counts = ", ".join(f"{k} {v}" for k, v in info["splits"][split]["label_counts"].items())
        log(f"{split}: {len(examples)} examples ({counts}); {info['splits'][split]['truncated']} truncated to "
            f"{data.seq_len} tokens")
    tokenizer.save_pretrained(out / "tokenizer")  # the export and `predict` use exactly this tokenizer
    write_durable(out / LabelledData.FILE, json.dumps(info, indent=1))
    return LabelledData(out, info)


def _split(data: DataConfig) -> dict[str, list[Example]]:
    """train/validation/test: given sources, or held out of the train source by a hash of the text."""
    if len(data.sources) != 1:
        raise DataError("data.sources: classification reads one labelled train source (give validation/test "
                        "as data.validation and data.test)")
    train = _read(data.sources[0], data, "data.sources")
    held = {split: _read(source, data, f"data.{split}") if source else None
            for split, source in (("validation", data.validation), ("test", data.test))}
    fractions = {"validation": 0 if held["validation"] is not None else data.validation_fraction,
                 "test": 0 if held["test"] is not None else data.test_fraction}
    splits = {"train": [], "validation": held["validation"] or [], "test": held["test"] or []}
    for example in train:
        splits[split_of(example.text, fractions)].append(example)
    for split in ("train", "validation"):
        if not splits[split]:
            raise DataError(f"data.sources: no {split} examples (raise data.validation_fraction, or give "
                            "data.validation)" if split == "validation" else "data.sources: no training examples")
    return splits


def _read(source: SourceConfig, data: DataConfig, key: str) -> list[Example]:
    """The source's examples; rows labelled outside data.labels (when given) are left out before any check."""
    text_field, label_field = data.text_field_of(source), data.label_field
    examples = []
    for location, i, row in iter_rows(source):
        where = f"{location}: row {i}"
        if label_field not in row:
            raise DataError(f"{where} has no {label_field!r} field (data.label_field); its fields: {', '.join(row)}")
        if data.labels is not None and str(row[label_field]) not in data.labels:
            continue
        if row[label_field] is None:
            raise DataError(f"{where}: the label ({label_field!r}) is empty")
        if text_field not in row:
            raise DataError(f"{where} has no {text_field!r} field (data.text_field); its fields: {', '.join(row)}")
        text = row[text_field] or ""
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: the text ({text_field!r}) is empty" if isinstance(text, str) else
                            f"{where}: the text field {text_field!r} is {type(text).__name__}, not text")
        examples.append(Example(text, str(row[label_field]), where))
    if not examples:
        raise DataError(f"{key}: {source.path or source.hub} holds no rows" + (" with one of data.labels" if
                                                                               data.labels else ""))
    return examples


def _label_names(data: DataConfig, splits: dict[str, list[Example]]) -> list[str]:
    """The label names in id order: data.labels, or those of the training split (numbers in numeric order).
    A held-out example's label must be one the model trains on."""
    seen = Counter(e.label for e in splits["train"])
    if data.labels is None:
        labels = sorted(seen, key=lambda name: (not _is_int(name), int(name) if _is_int(name) else 0, name))
        if len(labels) < 2:
            raise DataError(f"data.label_field: the training split has one label only ({labels[0]!r})")
    else:
        labels = list(data.labels)
        missing = [name for name in labels if name not in seen]
        if missing:
            raise DataError(f"data.labels: {missing[0]!r} does not occur in the training split "
                            f"(its labels: {', '.join(sorted(seen))})")
    for split in ("validation", "test"):
        bad = next((e for e in splits[split] if e.label not in seen), None)
        if bad:
            raise DataError(f"{bad.where}: label {bad.label!r} does not occur in the training split; a model "
                            "cannot learn it (list the labels to keep in data.labels)")
    return labels


def _is_int(name: str) -> bool:
    return name.removeprefix("-").isdigit()


def _write_split(folder: Path, examples: list[Example], labels: list[str], tokenizer, seq_len: int,
                 truncation: str) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    encoded = tokenizer([e.text for e in examples], return_special_tokens_mask=True) if examples else \
        {"input_ids": [], "special_tokens_mask": []}  # data.test_fraction 0: no test split
    rows = [kept(ids, special, seq_len, truncation)
            for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = {name: i for i, name in enumerate(labels)}
    arrays = {"input_ids": np.asarray([row + [pad] * (seq_len - len(row)) for row in rows], np.int32).reshape(-1,
                                                                                                            seq_len),
              "attention_mask": np.asarray([[1] * len(row) + [0] * (seq_len - len(row)) for row in rows],
                                           np.uint8).reshape(-1, seq_len),
              "labels": np.asarray([ids[e.label] for e in examples], np.int64)}
    files = write_arrays(folder, arrays)
    counts = Counter(e.label for e in examples)
    return {"examples": len(examples), "label_counts": {name: counts[name] for name in labels},
            "truncated": sum(len(ids) > seq_len for ids in encoded["input_ids"]), "files": files}


def kept(ids: list[int], special: list[int], seq_len: int, truncation: str) -> list[int]:
    """At most seq_len tokens of an encoded text, the tokenizer's special tokens around it ([CLS], [SEP]) kept:
    of the text's own, the first ones, the last ones, or a quarter from its start and the rest from its end
    (data.truncation; head+tail did best on long documents in Sun et al. 2019, "How to Fine-Tune BERT for Text
    Classification")."""
    if len(ids) <= seq_len:
        return ids
    start = next((i for i, s in enumerate(special) if not s), len(ids))
    end = len(ids) - next((i for i, s in enumerate(reversed(special)) if not s), len(ids))
    budget = seq_len - start - (len(ids) - end)
    head = {"head": budget, "tail": 0, "head+tail": budget // 4}[truncation]
    return ids[:start + head] + ids[end - (budget - head):end] + ids[end:]


def _inputs_fingerprint(data: DataConfig, tokenizer_hash: str) -> str:
    sources = [s for s in (data.sources[0], data.validation, data.test) if s is not None]
    units = [[u.__dict__ for u in source_units(s)] for s in sources]
    settings = [data.text_field, data.label_field, data.labels, data.seq_len, data.validation_fraction,
                data.test_fraction, [s.model_dump() for s in sources]]
    if data.truncation != "head":  # the default cuts as before it could be chosen: the same data, the same print
        settings.append(data.truncation)
    return fingerprint(units, settings, tokenizer_hash)


@dataclass(frozen=True)
class LabelledData(ArrayRecord, file="labelled.json", format=2, what="labelled data"):
    """Example i of a split: {input_ids, attention_mask, labels} tensors (`split`)."""

    ARRAYS, ROWS = ARRAYS, "examples"

    @property
    def labels(self) -> list[str]:
        return self.data["labels"]

    def label_counts(self, split: str) -> dict[str, int]:
        return self.data["splits"][split]["label_counts"]
