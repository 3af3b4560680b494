"""`zerotrain prepare`: sources -> tokenizer + train/validation token shards per source + manifest.json.

Work is cut into chunks: consecutive units (files) of one source, about one shard of text each. A chunk
is tokenized by a pool of processes (all cores) and written as its own shards plus a small chunk record,
written last. So an interrupted prepare resumes at the first unfinished chunk, and a large corpus can be
split over processes or nodes (`--part I/N` takes every N-th chunk); whichever part finishes last merges
the chunk records into manifest.json. manifest.json, written last of all, means the data is complete.
"""
import errno
import itertools
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.files import fingerprint, full_disk, write_durable
from data_pipeline.manifest import SPLITS, Manifest
from data_pipeline.record import verify_file
from data_pipeline.shards import ShardWriter, token_dtype
from data_pipeline.sources import Unit, builder_for, file_problem, iter_texts, source_units
from data_pipeline.splits import split_of
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe

BATCH_CHARS = 2**18  # text per tokenizer call: enough to amortise the call, small enough to spread the work
BYTES_PER_TOKEN = 4  # rough size of a token in English text: sizes a chunk to about one shard
INPUTS_MARK = "zerotrain-inputs.txt"  # in the tokenizer folder: the inputs it was prepared for


@dataclass(frozen=True)
class Chunk:
    source: SourceConfig
    index: int  # within its source
    units: tuple[Unit, ...]

    @property
    def name(self) -> str:
        return f"{self.source.name}/c{self.index:05d}"


def prepare(data: DataConfig, tokenizer: TokenizerConfig, log=print, *,
            part: tuple[int, int] = (0, 1)) -> Manifest | None:
    """Prepare this part's chunks; returns the manifest once every part's chunks are done, else None."""
    try:
        return _prepare(data, tokenizer, log, part)
    except OSError as e:
        if e.errno != errno.ENOSPC and not full_disk(data.prepared_dir):
            raise
        raise DataError(f"data.prepared_dir: the disk holding {data.prepared_dir} is full; free space (or choose "
                        "another prepared_dir) and prepare again: it resumes at the first unfinished chunk") from None


def _prepare(data: DataConfig, tokenizer: TokenizerConfig, log, part: tuple[int, int]) -> Manifest | None:
    out = Path(data.prepared_dir)
    chunks = plan_chunks(data)
    inputs = _inputs(chunks, data, tokenizer)
    inputs_fingerprint = fingerprint(inputs)
    if (out / Manifest.FILE).exists():
        reused = _reuse(Manifest.load(out), inputs, inputs_fingerprint, chunks, log)
        if reused is not None:
            return reused
    _check_document_count(chunks)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = _tokenizer(out, chunks, data, tokenizer, inputs_fingerprint, log)
    index, count = part
    todo = [c for i, c in enumerate(chunks) if i % count == index and not _chunk_done(out, c)]
    if todo:
        _tokenize_chunks(todo, out, tok_dir, data, log)
    missing = [c.name for c in chunks if not _chunk_done(out, c)]
    if missing:
        log(f"part {index + 1}/{count} done; {len(missing)} chunk(s) of other parts still to prepare "
            f"(the part finishing last writes manifest.json)")
        return None
    return _merge(out, data, chunks, inputs, inputs_fingerprint, tok_dir, log)


def plan_chunks(data: DataConfig) -> list[Chunk]:
    target = data.shard_tokens * BYTES_PER_TOKEN
    chunks = []
    for source in data.sources:
        group, size, index = [], 0, 0
        for unit in source_units(source):
            group.append(unit)
            size += unit.bytes
            if size >= target:
                chunks.append(Chunk(source, index, tuple(group)))
                group, size, index = [], 0, index + 1
        if group:
            chunks.append(Chunk(source, index, tuple(group)))
    return chunks


def _inputs(chunks: list[Chunk], data: DataConfig, tokenizer: TokenizerConfig) -> dict:
    """Everything the prepared data depends on; its hash decides whether existing work can be reused."""
    given = load_tokenizer(tokenizer.path) if tokenizer.path else None
    return {
        "sources": [{**s.model_dump(mode="json", exclude={"weight"}), "text_field": data.text_field_of(s),
                     "units": [u.__dict__ for c in chunks if c.source is s for u in c.units]}
                    for s in data.sources],
        # A given tokenizer counts by content, so replacing the files in its folder counts as a change.
        "tokenizer_config": {**tokenizer.model_dump(mode="json"),
                             "fingerprint": tokenizer_fingerprint(given) if given else None},
        "validation_fraction": data.validation_fraction,
        "shard_tokens": data.shard_tokens,
    }


def _reuse(manifest: Manifest, inputs: dict, inputs_fingerprint: str, chunks: list[Chunk], log) -> Manifest | None:
    """The prepared data, if it is of these inputs and intact. A shard that is missing, truncated or corrupt is
    repaired: the chunks that wrote it are undone (their records and the manifest removed) and None is returned,
    so that prepare makes them again."""
    if manifest.data["inputs_fingerprint"] != inputs_fingerprint:
        changed = ", ".join(k for k in inputs if manifest.data["inputs"].get(k) != inputs[k])
        raise DataError(f"data.prepared_dir: {manifest.dir} holds data prepared from other inputs "
                        f"(changed: {changed}); choose another prepared_dir or delete it")
    damaged = {}
    for file in manifest.files():
        try:
            verify_file(file)
        except DataError as e:
            damaged[str(file.path.relative_to(manifest.dir))] = str(e).split(";")[0]
    if not damaged:
        manifest.check_tokenizer()
        log(f"prepared data up to date in {manifest.dir}")
        return manifest
    undone = [c for c in chunks if _chunk_shards(manifest.dir, c) & damaged.keys()]
    log(f"repairing {manifest.dir}: {next(iter(damaged.values()))}; making {len(undone)} chunk(s) again")
    for chunk in undone:
        (manifest.dir / f"{chunk.name}.json").unlink()
    (manifest.dir / Manifest.FILE).unlink()
    return None


def _chunk_shards(out: Path, chunk: Chunk) -> set[str]:
    """The shard files a chunk's record lists (none when it has no record)."""
    record = out / f"{chunk.name}.json"
    if not record.exists():
        return set()
    return {shard["file"] for shards in json.loads(record.read_text())["splits"].values() for shard in shards}


def _tokenizer(out: Path, chunks: list[Chunk], data: DataConfig, tokenizer: TokenizerConfig,
               inputs_fingerprint: str, log) -> Path:
    """The prepared tokenizer folder: made once, then shared by every part and every resumed prepare."""
    tok_dir = out / "tokenizer"
    if not tok_dir.exists():
        start = time.perf_counter()
        tok = load_tokenizer(tokenizer.path) if tokenizer.path else _train_tokenizer(chunks, data, tokenizer)
        tmp = out / f"tokenizer.tmp-{os.getpid()}"
        tok.save_pretrained(tmp)
        (tmp / INPUTS_MARK).write_text(inputs_fingerprint)
        try:
            tmp.rename(tok_dir)  # atomic: a part racing us either wins or finds ours complete
            log(f"tokenizer: {len(tok)} tokens ({'given' if tokenizer.path else 'trained'}) "
                f"in {time.perf_counter() - start:.1f}s")
        except OSError:
            shutil.rmtree(tmp)
    mark = tok_dir / INPUTS_MARK
    if not mark.exists() or mark.read_text() != inputs_fingerprint:
        raise DataError(f"data.prepared_dir: {out} holds an unfinished prepare of other inputs; "
                        "choose another prepared_dir or delete it")
    return tok_dir


def _train_tokenizer(chunks: list[Chunk], data: DataConfig, tokenizer: TokenizerConfig):
    """A BPE trained on the training split, each source contributing text in proportion to its weight (or,
    without weights, to its size on disk)."""
    sizes = {s.name: sum(u.bytes for c in chunks if c.source is s for u in c.units) or 1 for s in data.sources}
    shares = {s.name: s.weight or sizes[s.name] for s in data.sources}

    def sample(source: SourceConfig):
        budget = int(tokenizer.train_sample_bytes * shares[source.name] / sum(shares.values()))
        docs = (text for c in chunks if c.source is source
                for text in iter_texts(list(c.units), source, data.text_field_of(source))
                if split_of(text, {"validation": data.validation_fraction}) == "train")
        return _first_bytes(docs, budget)

    return train_bpe(itertools.chain.from_iterable(sample(s) for s in data.sources), tokenizer.vocab_size)


def _tokenize_chunks(todo: list[Chunk], out: Path, tok_dir: Path, data: DataConfig, log) -> None:
    workers = os.cpu_count() or 1
    start, tokens = time.perf_counter(), 0
    # Worker processes each tokenize whole batches single-threaded; the parent reads and writes. Forked, not
    # spawned: a spawned worker would import this package (torch, transformers, datasets) for seconds.
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                             initargs=(str(tok_dir / "tokenizer.json"),)) as pool:
        tok = load_tokenizer(tok_dir)
        dtype, eos = token_dtype(len(tok)), tok.eos_token_id
        for chunk in todo:
            tokens += _tokenize_chunk(chunk, out, pool, workers, dtype, eos, data)
    seconds = time.perf_counter() - start
    log(f"tokenized {len(todo)} chunk(s), {tokens:,} tokens in {seconds:.1f}s "
        f"({tokens / seconds:,.0f} tokens/s, {workers} processes)")


def _tokenize_chunk(chunk: Chunk, out: Path, pool, workers: int, dtype, eos: int, data: DataConfig) -> int:
    (out / chunk.source.name).mkdir(exist_ok=True)
    writers = {split: ShardWriter(out, f"{chunk.name}-{split}", dtype, data.shard_tokens) for split in SPLITS}
    field = data.text_field_of(chunk.source)
    docs = ((split_of(text, {"validation": data.validation_fraction}), text)
            for text in iter_texts(list(chunk.units), chunk.source, field))
    for splits, (flat, lengths) in _ordered_map(pool, _encode, _batches(docs), window=2 * workers, eos=eos, dtype=dtype):
        for split, ids in zip(splits, np.split(flat, np.cumsum(lengths)[:-1])):
            writers[split].add(ids)
    record = {"units": [u.__dict__ for u in chunk.units],
              "splits": {split: writer.close() for split, writer in writers.items()}}
    write_durable(out / f"{chunk.name}.json", json.dumps(record, indent=1))
    return sum(s["num_tokens"] for shards in record["splits"].values() for s in shards)


def _batches(docs):
    """Documents grouped into lists of about BATCH_CHARS characters (a long document makes its own batch)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_map(pool, fn, batches, window: int, **kwargs):
    """pool.map with at most `window` batches in flight: a huge chunk is never read into memory at once."""
    pending = deque()
    for batch in batches:
        splits, texts = zip(*batch)
        pending.append((splits, pool.submit(fn, texts, **kwargs)))
        if len(pending) >= window:
            splits, future = pending.popleft()
            yield splits, future.result()
    while pending:
        splits, future = pending.popleft()
        yield splits, future.result()


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_tokenizer = Tokenizer.from_file(tokenizer_file)


def _encode(texts, eos: int, dtype) -> tuple[np.ndarray, list[int]]:
    """One flat token array (eos after each document) and the document lengths: cheap to send back."""
    encodings = _worker_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ids = [e.ids + [eos] for e in encodings]
    return np.fromiter(itertools.chain.from_iterable(ids), dtype), [len(i) for i in ids]


def _chunk_done(out: Path, chunk: Chunk) -> bool:
    record = out / f"{chunk.name}.json"
    return record.exists() and json.loads(record.read_text())["units"] == [u.__dict__ for u in chunk.units]


def _merge(out: Path, data: DataConfig, chunks: list[Chunk], inputs: dict, inputs_fingerprint: str, tok_dir: Path,
           log) -> Manifest:
    tok = load_tokenizer(tok_dir)
    records = {c.name: json.loads((out / f"{c.name}.json").read_text()) for c in chunks}
    sources = []
    for source in data.sources:
        mine = [records[c.name] for c in chunks if c.source is source]
        sources.append({"name": source.name, "weight": source.weight,
                        "splits": {split: _split_summary([s for r in mine for s in r["splits"][split]])
                                   for split in SPLITS}})
    _check_splits(sources)
    manifest = {
        "format": Manifest.FORMAT,
        "inputs_fingerprint": inputs_fingerprint,
        "inputs": inputs,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                      "eos_id": tok.eos_token_id},
        "dtype": token_dtype(len(tok)).name,
        "sources": sources,
    }
    write_durable(out / Manifest.FILE, json.dumps(manifest, indent=1))
    for s in sources:
        for split, info in s["splits"].items():
            log(f"{s['name']} {split}: {info['num_docs']:,} docs, {info['num_tokens']:,} tokens, "
                f"{len(info['shards'])} shard(s)")
    return Manifest(out, manifest)


def _first_bytes(texts, max_bytes: int):
    for text in texts:
        if max_bytes <= 0:
            return
        head = text.encode()[:max_bytes]
        max_bytes -= len(head)
        yield head.decode(errors="ignore")  # a cut may split a multi-byte character


def _split_summary(shards: list[dict]) -> dict:
    return {"num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": sum(s["num_docs"] for s in shards),
            "shards": shards}


def _check_splits(sources: list[dict]) -> None:
    for s in sources:
        if not s["splits"]["train"]["num_docs"]:
            raise DataError(f"data.sources: source {s['name']!r} has no document in the train split "
                            "(empty, or data.validation_fraction took them all)")
    if not any(s["splits"]["validation"]["num_docs"] for s in sources):
        total = sum(s["splits"]["train"]["num_docs"] for s in sources)
        if total < 2:
            raise _one_document()
        raise DataError(f"data.validation_fraction: puts none of the {total} documents in the validation "
                        "split; raise it")


def _one_document() -> DataError:
    return DataError("data.sources: hold 1 document, and the validation split takes whole documents; give more "
                     "(a plain text file is one document: several files, or JSON lines with one per row)")


def _check_document_count(chunks: list[Chunk]) -> None:
    """Before the tokenizer is trained: sources of plain text files hold one document per file, so one such
    file is one document, which cannot make a training and a validation split."""
    units = [unit for chunk in chunks for unit in chunk.units]
    if len(units) == 1 and units[0].kind == "file" and builder_for(Path(units[0].location))[0] == "text":
        problem = file_problem(Path(units[0].location))  # a file that is no text at all is the first thing to say
        raise DataError(f"{units[0].location}: {problem}") if problem else _one_document()
