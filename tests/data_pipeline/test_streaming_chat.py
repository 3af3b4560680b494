"""Streaming chat data on real ShareGPT rows and SmolLM2's real tokenizer and template: one epoch holds exactly the
conversations `zerotrain prepare` makes of the same rows, and a resume continues exactly."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, DataError
from data_pipeline.conversations import IGNORE, prepare_chat
from data_pipeline.streaming_chat import StreamingChatDataset
from helpers import REPO

SMOLLM = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
SHAREGPT = REPO / "data" / "sharegpt" / "sharegpt.jsonl"
SHAREGPT_NAMES = {"messages_field": "conversations", "role_field": "from", "content_field": "value",
                  "roles": {"human": "user", "gpt": "assistant"}}
SEQ_LEN = 512
K = 6  # samples compared after a resume


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The first 200 ShareGPT conversations, messy rows included."""
    if not (SMOLLM / "tokenizer.json").is_file() or not SHAREGPT.is_file():
        pytest.fail(f"{SMOLLM} or {SHAREGPT} is missing: run `make data` (make test does)")
    path = tmp_path_factory.mktemp("chat") / "sharegpt-200.jsonl"
    with open(SHAREGPT) as f:
        path.write_text("".join(line for _, line in zip(range(200), f)))
    return path


def config(rows, tmp_path, **chat) -> DataConfig:
    return DataConfig(sources=[str(rows)], prepared_dir=tmp_path / "prepared", seq_len=SEQ_LEN,
                      chat={**SHAREGPT_NAMES, "skip_invalid": True, **chat})


def stream(rows, data: DataConfig, shuffle_buffer=1000) -> StreamingChatDataset:
    return StreamingChatDataset([rows], data, SMOLLM, rank=0, world_size=1, seed=5, shuffle_buffer=shuffle_buffer)


def conversations(sample: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A sample's conversations (ids, labels), in order: the runs of positions from 0, less the padding (nothing
    learned)."""
    starts = np.flatnonzero(sample["position_ids"].numpy() == 0)
    runs = zip(np.split(sample["input_ids"].numpy(), starts[1:]), np.split(sample["labels"].numpy(), starts[1:]))
    return [(tuple(ids), tuple(labels)) for ids, labels in runs if (labels != IGNORE).any()]


def test_an_epoch_holds_the_prepared_conversations_and_resumes_exactly(rows, tmp_path):
    data = config(rows, tmp_path)
    chat = prepare_chat(data, SMOLLM, log=lambda line: None)
    prepared = [c for split in ("train", "validation") for i in range(chat.rows(split))
                for c in conversations(chat.split(split)[i])]
    ds = stream(rows, data, shuffle_buffer=10_000)  # one block: the epoch's row order is one permutation
    samples, states, streamed = [], [ds.state_dict()], []  # states[n]: taken after n samples
    for sample in ds:
        assert {name: (t.shape, t.dtype) for name, t in sample.items()} == \
            {name: ((SEQ_LEN,), torch.int64) for name in ("input_ids", "labels", "position_ids")}
        samples.append(sample)
        states.append(ds.state_dict())
        streamed += conversations(sample)
        if len(streamed) < len(prepared):
            epoch_samples = len(samples) + 1  # the samples that hold epoch 0 (the last may begin epoch 1)
        elif len(samples) == epoch_samples + K:
            break
    assert sorted(streamed[:len(prepared)]) == sorted(prepared)  # the same conversations, token for token, once
    assert sum(len(conversations(s)) > 1 for s in samples) > 1  # packed: some samples hold several
    first_of_epoch_1 = next(n for n, s in enumerate(states) if s["epoch"] == 1)
    for n in (0, 1, len(samples) // 2, first_of_epoch_1 - 1, first_of_epoch_1):
        resumed = stream(rows, data, shuffle_buffer=10_000)
        resumed.load_state_dict(json.loads(json.dumps(states[n])))  # it must survive a JSON checkpoint
        following = itertools.islice(resumed, K)
        assert all(torch.equal(a[name], b[name]) for a, b in zip(following, samples[n:n + K], strict=True)
                   for name in a), n


def test_blocks_and_packing_off(rows, tmp_path):
    """Small shuffle blocks resume exactly too; data.packing false gives each conversation its own sample."""
    data = config(rows, tmp_path, train_on="last_assistant")
    data.packing = False
    ds, samples, states = stream(rows, data, shuffle_buffer=16), [], []
    for sample in itertools.islice(ds, 40):  # from 5 blocks of 16 rows
        samples.append(sample)
        states.append(ds.state_dict())
    assert all(len(conversations(s)) == 1 for s in samples) and states[-1]["block"] >= 2
    resumed = stream(rows, data, shuffle_buffer=16)
    resumed.load_state_dict(states[20])
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(itertools.islice(resumed, 10), samples[21:31]))


def test_bad_rows_are_refused_naming_the_row_as_prepare_does(tmp_path):
    chat_file = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    empty = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    chat_file.write_text("".join(json.dumps(row) + "\n" for row in (good, good, empty)))
    data = DataConfig(sources=[str(chat_file)], prepared_dir=tmp_path / "prepared", seq_len=64)
    with pytest.raises(DataError) as refused:
        next(iter(stream(chat_file, data)))
    assert str(refused.value) == f"{chat_file}: row 2: turn 1 (assistant) is empty (data.chat.skip_invalid: true " \
                                 "leaves such rows out)"
    data.chat.skip_invalid = True
    ds = stream(chat_file, data)
    assert len(list(itertools.islice(ds, 3))) == 3  # 2 conversations an epoch: the empty row was read
    assert set(ds.state_dict()["left_out"]) == {"empty message"}
    chat_file.write_text(json.dumps(empty) + "\n")  # nothing left to train on: said, not an endless loop
    with pytest.raises(DataError, match=r"none of rank 0's conversations is left to train on \(left out: 2 empty"):
        next(iter(stream(chat_file, data)))
