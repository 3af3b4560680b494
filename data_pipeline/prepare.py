"""`zerotrain prepare`: source files -> tokenizer + train/validation token shards + manifest.json, done once.

manifest.json is written last, so its presence means the prepared data is complete. It records what the
data was made from, so a later prepare into the same folder either reuses it or refuses to overwrite it.
"""
import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.shards import ShardWriter, TokenStore, token_dtype, write_atomic
from data_pipeline.sources import iter_documents, resolve_files
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe

FORMAT = 1
SPLITS = ("train", "validation")
BATCH_DOCS = 64  # documents per tokenizer call: big enough for its thread pool, small enough for memory


@dataclass(frozen=True)
class Manifest:
    dir: Path
    data: dict  # the parsed manifest.json

    @classmethod
    def load(cls, prepared_dir: str | Path) -> "Manifest":
        path = Path(prepared_dir) / "manifest.json"
        if not path.exists():
            raise DataError(
                f"data.prepared_dir: no prepared data at {prepared_dir} (manifest.json missing); "
                "run `zerotrain prepare CONFIG`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if data.get("format") != FORMAT:
            raise DataError(f"{path}: manifest format {data.get('format')!r}, this zerotrain reads format {FORMAT}")
        return cls(Path(prepared_dir), data)

    @property
    def fingerprint(self) -> str:
        """Identity of the token stream (inputs and tokenizer), recorded in checkpoints."""
        both = self.data["inputs_fingerprint"] + self.data["tokenizer"]["fingerprint"]
        return hashlib.sha256(both.encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.data["tokenizer"]["eos_id"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.data["tokenizer"]["path"]

    def store(self, split: str) -> TokenStore:
        return TokenStore(self.dir, self.data["splits"][split]["shards"], self.data["dtype"], name=split)

    def num_tokens(self, split: str) -> int:
        return self.data["splits"][split]["num_tokens"]

    def verify(self) -> None:
        """Every shard has its recorded size and checksum, and the tokenizer is the one the shards were made with."""
        for split in SPLITS:
            self.store(split).verify()
        if tokenizer_fingerprint(load_tokenizer(self.tokenizer_dir)) != self.data["tokenizer"]["fingerprint"]:
            raise DataError(f"{self.tokenizer_dir}: tokenizer differs from the one the shards were made with")


def prepare(data: DataConfig, tokenizer: TokenizerConfig, log=print) -> Manifest:
    out = Path(data.prepared_dir)
    files = resolve_files(data.sources)
    tok = load_tokenizer(tokenizer.path) if tokenizer.path else None
    inputs = _inputs(files, data, tokenizer, tok)
    inputs_fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    if (out / "manifest.json").exists():
        return _reuse(Manifest.load(out), inputs, inputs_fingerprint, log)

    out.mkdir(parents=True, exist_ok=True)
    if tok is None:
        tok = _train_tokenizer(files, data, tokenizer, log)
    tok.save_pretrained(out / "tokenizer")
    dtype = token_dtype(len(tok))
    manifest = {
        "format": FORMAT,
        "inputs_fingerprint": inputs_fingerprint,
        **inputs,
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": len(tok),
            "eos_id": tok.eos_token_id,
            "path": "tokenizer",
        },
        "dtype": dtype.name,
        "splits": _write_shards(files, data, tok, dtype, out, log),
    }
    write_atomic(out / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    return Manifest(out, manifest)


def _inputs(files: list[Path], data: DataConfig, tokenizer: TokenizerConfig, tok) -> dict:
    """Everything the prepared data depends on; its hash decides whether an existing prepare can be reused."""
    return {
        "files": [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files],
        "text_field": data.text_field,
        # A given tokenizer counts by content, so replacing the files in its folder counts as a change.
        "tokenizer_config": {
            **tokenizer.model_dump(mode="json"),
            "fingerprint": tokenizer_fingerprint(tok) if tok is not None else None,
        },
        "validation_fraction": data.validation_fraction,
        "shard_tokens": data.shard_tokens,
    }


def _train_tokenizer(files: list[Path], data: DataConfig, tokenizer: TokenizerConfig, log):
    start = time.perf_counter()
    train_docs = (text for key, text in iter_documents(files, data.text_field) if _split(key, data) == "train")
    tok = train_bpe(_first_bytes(train_docs, tokenizer.train_sample_bytes), tokenizer.vocab_size)
    log(f"trained a {len(tok)}-token byte-level BPE in {time.perf_counter() - start:.1f}s")
    return tok


def _write_shards(files: list[Path], data: DataConfig, tok, dtype, out: Path, log) -> dict:
    start = time.perf_counter()
    writers = {split: ShardWriter(out, split, dtype, data.shard_tokens) for split in SPLITS}
    docs = ((_split(key, data), text) for key, text in iter_documents(files, data.text_field))
    while batch := list(itertools.islice(docs, BATCH_DOCS)):
        batch_splits, texts = zip(*batch)
        token_ids = tok(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for split, ids in zip(batch_splits, token_ids):
            writers[split].add(ids + [tok.eos_token_id])
    splits = {split: _split_summary(writer.close()) for split, writer in writers.items()}
    seconds = time.perf_counter() - start
    _check_splits(splits, data)
    for split, s in splits.items():
        log(f"{split}: {s['num_docs']:,} docs, {s['num_tokens']:,} tokens, {len(s['shards'])} shards")
    total = sum(s["num_tokens"] for s in splits.values())
    log(f"tokenized {total:,} tokens in {seconds:.1f}s ({total / seconds:,.0f} tokens/s)")
    return splits


def _reuse(manifest: Manifest, inputs: dict, inputs_fingerprint: str, log) -> Manifest:
    if manifest.data["inputs_fingerprint"] != inputs_fingerprint:
        changed = ", ".join(k for k in inputs if manifest.data.get(k) != inputs[k])
        raise DataError(
            f"data.prepared_dir: {manifest.dir} holds data prepared from other inputs (changed: {changed}); "
            "choose another prepared_dir or delete it"
        )
    manifest.verify()
    log(f"prepared data up to date in {manifest.dir}")
    return manifest


def _split(doc_key: str, data: DataConfig) -> str:
    """By a hash of the document's key: the same document always lands in the same split."""
    u = int(hashlib.sha256(doc_key.encode()).hexdigest()[:16], 16) / 2**64
    return "validation" if u < data.validation_fraction else "train"


def _first_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    for text in texts:
        head = text.encode()[:max_bytes]
        max_bytes -= len(head)
        yield head.decode(errors="ignore")  # a cut may split a multi-byte character
        if max_bytes <= 0:
            return


def _split_summary(shards: list[dict]) -> dict:
    return {
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_docs": sum(s["num_docs"] for s in shards),
        "shards": shards,
    }


def _check_splits(splits: dict, data: DataConfig) -> None:
    num_docs = sum(s["num_docs"] for s in splits.values())
    if not num_docs:
        raise DataError(f"data.sources: {data.sources} hold no non-empty document")
    if not splits["validation"]["num_docs"]:
        raise DataError(
            f"data.validation_fraction: {data.validation_fraction} puts none of the {num_docs} documents "
            "in the validation split; raise it"
        )
    if not splits["train"]["num_docs"]:
        raise DataError(
            f"data.validation_fraction: {data.validation_fraction} puts all {num_docs} documents "
            "in the validation split; lower it or add documents"
        )
