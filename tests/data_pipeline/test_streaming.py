"""Streaming mode on real text: packed windows, disjoint ranks, exact resume, seeded order, bad inputs."""
import functools
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_pipeline import DataError, load_tokenizer, train_bpe
from data_pipeline.streaming import StreamingPackedDataset

SEQ_LEN = 64
K = 40  # samples compared after a resume


@pytest.fixture(scope="module")
def poems(corpus) -> list[Path]:
    """The four shortest texts (2-86 KB), one document each: whole epochs take well under a second."""
    return sorted(corpus.glob("*_gut.txt"), key=lambda p: p.stat().st_size)[:4]


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe((p.read_text() for p in sorted(corpus.glob("[a-c]*_gut.txt"))), vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def paragraphs(poems, tmp_path_factory) -> list[Path]:
    """The poems as jsonl, one paragraph per row (hundreds of documents per file), with a second column."""
    folder = tmp_path_factory.mktemp("jsonl")
    files = []
    for poem in poems:
        files.append(folder / f"{poem.stem}.jsonl")
        rows = [{"text": text, "line": i} for i, text in enumerate(poem.read_text().split("\n\n")) if text.strip()]
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def dataset(files, tokenizer_dir, rank=0, world_size=1, seed=0, shuffle_buffer=16) -> StreamingPackedDataset:
    return StreamingPackedDataset(files, "text", tokenizer_dir, SEQ_LEN, rank, world_size, seed, shuffle_buffer)


def take(ds, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(ds, n))


def encoded(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


def first_documents(ds, tok, n: int) -> list[tuple[int, ...]]:
    """The first n documents of a fresh stream: its tokens (each window less its last) cut after each eos."""
    tokens, eos_seen = [], 0
    for window in ds:
        tokens += window[:-1].tolist()
        eos_seen += int((window[:-1] == tok.eos_token_id).sum())
        if eos_seen >= n:
            ends = np.flatnonzero(np.array(tokens) == tok.eos_token_id)[:n] + 1
            return [tuple(doc) for doc in np.split(tokens, ends)[:n]]


def test_windows_pack_the_documents(poems, tokenizer_dir, tok):
    windows = take(dataset(poems, tokenizer_dir), 200)
    assert all(w.shape == (SEQ_LEN + 1,) and w.dtype == torch.long for w in windows)
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))  # consecutive windows share one token
    texts = [p.read_text() for p in poems]
    assert any(text.startswith(tok.decode(windows[0])) for text in texts)
    # One epoch is each file's text, tokenized, once, with eos after it.
    assert sorted(first_documents(dataset(poems, tokenizer_dir), tok, 4)) == sorted(encoded(tok, t) for t in texts)


@pytest.mark.parametrize("num_files", [4, 3], ids=["whole-files-per-rank", "every-other-document"])
def test_ranks_stream_disjoint_documents_that_make_the_epoch(poems, tokenizer_dir, tok, num_files):
    files = poems[:num_files]
    whole = first_documents(dataset(files, tokenizer_dir), tok, num_files)
    assert sorted(whole) == sorted(encoded(tok, p.read_text()) for p in files)
    per_rank = [first_documents(dataset(files, tokenizer_dir, rank, 2), tok, len(range(rank, num_files, 2)))
                for rank in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(whole)  # disjoint, and together the whole epoch


@pytest.mark.parametrize("source,rank,world_size,shuffle_buffer", [
    ("poems", 0, 1, 3),  # one document per file, each many windows long; blocks of 3 of the 4 files
    ("paragraphs", 1, 2, 16),  # hundreds of small documents per file, this rank reading 2 files at once
])
def test_resume_is_exact(request, tokenizer_dir, source, rank, world_size, shuffle_buffer):
    files = request.getfixturevalue(source)
    make = functools.partial(dataset, files, tokenizer_dir, rank, world_size, seed=3, shuffle_buffer=shuffle_buffer)
    ds, windows = make(), []
    states = [ds.state_dict()]  # states[n]: taken after n samples
    for window in ds:
        windows.append(window)
        states.append(ds.state_dict())
        if len(states) > K and states[-K - 1]["epoch"] == 1:  # K samples of epoch 1 recorded
            break
    first_of_block_1 = next(n for n, s in enumerate(states) if s["block"] == 1)
    first_of_epoch_1 = next(n for n, s in enumerate(states) if s["epoch"] == 1)
    for n in {0, 1, 17, first_of_block_1 - 1, first_of_block_1, first_of_epoch_1 - 1, first_of_epoch_1}:
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(states[n])))  # it must survive a JSON checkpoint
        assert all(torch.equal(a, b) for a, b in zip(take(resumed, K), windows[n : n + K], strict=True)), n


def test_resume_through_a_main_process_dataloader(paragraphs, tokenizer_dir):
    loader = DataLoader(dataset(paragraphs, tokenizer_dir), batch_size=4)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = loader.dataset.state_dict()
    resumed = DataLoader(dataset(paragraphs, tokenizer_dir), batch_size=4)
    resumed.dataset.load_state_dict(state)
    assert torch.equal(next(iter(resumed)), next(batches))
    workers = iter(DataLoader(dataset(paragraphs, tokenizer_dir), batch_size=4, num_workers=1))
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(workers)
    workers._shutdown_workers()  # now: left to the garbage collector, the shutdown waits out a 5 s timeout


def test_order_is_seeded_and_changes_every_epoch(paragraphs, tokenizer_dir, tok):
    docs_per_epoch = sum(len(f.read_text().splitlines()) for f in paragraphs)  # one row per line
    same, other = (first_documents(dataset(paragraphs, tokenizer_dir, seed=s), tok, 50) for s in (0, 1))
    two_epochs = first_documents(dataset(paragraphs, tokenizer_dir, seed=0), tok, 2 * docs_per_epoch)
    assert two_epochs[:50] == same and other != same
    first, second = two_epochs[:docs_per_epoch], two_epochs[docs_per_epoch:]
    assert first != second and sorted(first) == sorted(second)


def test_bad_inputs_are_refused_with_the_file_and_field(poems, paragraphs, tokenizer_dir, tmp_path):
    bad = tmp_path / "untitled.jsonl"
    bad.write_text(json.dumps({"body": "To be, or not to be"}) + "\n")
    # Alone, and after a good file (where datasets fails casting it to the first file's columns).
    for files in ([bad], [paragraphs[0], bad]):
        with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: has no 'text' text field \(data.text_field\)"):
            next(iter(dataset(files, tokenizer_dir)))
    with pytest.raises(DataError, match="no files"):
        dataset([], tokenizer_dir)
    with pytest.raises(DataError, match="no such tokenizer folder"):
        dataset(paragraphs, tmp_path / "missing")
    with pytest.raises(DataError, match="rank 1 of 2 got no document"):  # one document, two ranks
        next(iter(dataset(poems[:1], tokenizer_dir, 1, 2)))
    with pytest.raises(DataError, match="world_size"):
        dataset(paragraphs, tokenizer_dir, 0, 2).load_state_dict(dataset(paragraphs, tokenizer_dir).state_dict())
