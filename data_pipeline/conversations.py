"""Chat data for supervised fine-tuning (model.task sft): rows -> conversations -> samples of seq_len tokens that
say which tokens are learned, per split, saved once.

`prepare_chat` reads every row of the sources (data_pipeline.chat: the row's turns, rendered by the model's chat
template), holds out validation conversations by a hash of their turns (or reads data.validation), cuts or
leaves out those over data.seq_len (data.chat.too_long), leaves out and counts those with nothing left to learn,
packs several conversations into each sample (best-fit decreasing) or gives each its own (data.packing: false),
and writes each split as .npy arrays, then chat.json (last: its presence means the data is complete).

A sample: `input_ids`; `labels`, the next token where it is learned, else IGNORE; `position_ids`, restarting at
every conversation (and at the padding), which is how transformers keeps packed conversations apart.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.arrays import ArrayRecord, write_arrays
from data_pipeline.chat import ChatTemplate, Conversation, Skipped, read_conversation
from data_pipeline.config import ChatConfig, DataConfig
from data_pipeline.errors import DataError
from data_pipeline.files import fingerprint, write_durable
from data_pipeline.packing import best_fit_decreasing
from data_pipeline.sources import iter_rows, source_units
from data_pipeline.splits import split_of
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

SPLITS = ("train", "validation")
ARRAYS = ("input_ids", "labels", "position_ids")
IGNORE = -100  # the label of a token not learned (torch's cross-entropy ignores it)
ALWAYS_LEFT_OUT = ("no assistant turn", "too long", "nothing to learn")  # counted, never refused


@dataclass
class Example:
    ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False


def prepare_chat(data: DataConfig, tokenizer_dir: Path, log=print) -> ChatData:
    out = Path(data.prepared_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    template = chat_template(data, tokenizer, tokenizer_dir)
    inputs_fingerprint = chat_fingerprint(data, tokenizer_fingerprint(tokenizer), template.template)
    if (out / ChatData.FILE).is_file():
        existing = ChatData.load(out)
        if existing.fingerprint != inputs_fingerprint:
            raise DataError(f"data.prepared_dir: {out} holds chat data prepared from other inputs, settings or "
                            "another tokenizer; choose another prepared_dir or delete it")
        log(f"chat data in {out} is up to date")
        return existing
    splits, left_out, prompts = _read(data, template)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": ChatData.FORMAT, "inputs_fingerprint": inputs_fingerprint, "seq_len": data.seq_len,
            "packing": data.packing, "left_out": dict(left_out), "prompts": prompts, "splits": {}}
    for split, examples in splits.items():
        shutil.rmtree(out / split, ignore_errors=True)
        arrays = pack(examples, data.seq_len, data.packing, pad_id(tokenizer))
        info["splits"][split] = {**_summary(examples, arrays), "files": write_arrays(out / split, arrays)}
        log(_describe(split, info["splits"][split], data.seq_len))
    if left_out:
        log(describe_left_out(left_out))
    tokenizer.chat_template = template.template  # the export and `zerotrain chat` render with it
    tokenizer.save_pretrained(out / "tokenizer")
    write_durable(out / ChatData.FILE, json.dumps(info, indent=1))
    return ChatData(out, info)


def chat_template(data: DataConfig, tokenizer, tokenizer_dir: Path) -> ChatTemplate:
    """data.chat.template's, or else the tokenizer's."""
    path = data.chat.template
    if path is not None and not path.is_file():
        raise DataError(f"data.chat.template: {path}: no such file")
    return ChatTemplate(tokenizer, path and path.read_text(), str(path or tokenizer_dir))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _read(data: DataConfig, template: ChatTemplate) -> tuple[dict[str, list[Example]], Counter, list[dict]]:
    """Each split's examples, what was left out (by reason), and the held-out prompts shown at validation."""
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    left_out, prompts = Counter(), []
    fraction = 0 if data.validation else data.validation_fraction
    sources = [(s, None) for s in data.sources] + ([(data.validation, "validation")] if data.validation else [])
    for source, given in sources:
        for location, i, row in iter_rows(source):
            try:
                conversation = read_conversation(row, f"{location}: row {i}", data.chat)
                example = make_example(conversation, template, data)
            except Skipped as e:
                left_out[left_out_reason(e, data.chat)] += 1
                continue
            split = given or split_of(json.dumps(conversation.messages), {"validation": fraction})
            splits[split].append(example)
            if split == "validation" and len(prompts) < data.chat.sample_prompts and conversation.prompt:
                prompts.append(_prompt(conversation, template))
    for split, examples in splits.items():
        if not examples:
            why = f" ({describe_left_out(left_out)})" if left_out else \
                "; raise data.validation_fraction, or give data.validation" if split == "validation" else ""
            raise DataError(f"data.sources: no {split} conversation is left to train on{why}")
    return splits, left_out, prompts


def left_out_reason(error: DataError, chat: ChatConfig) -> str:
    """The reason to count a row that cannot be trained on under; `error` raised again if it is not a Skipped,
    and a refusal naming the row if only data.chat.skip_invalid leaves such rows out."""
    if not isinstance(error, Skipped):
        raise error
    if error.reason not in ALWAYS_LEFT_OUT and not chat.skip_invalid:
        raise DataError(f"{error} (data.chat.skip_invalid: true leaves such rows out)") from None
    return error.reason


def describe_left_out(left_out: dict[str, int]) -> str:
    return "left out: " + ", ".join(f"{n} {reason}" for reason, n in left_out.items())


def make_example(conversation: Conversation, template: ChatTemplate, data: DataConfig) -> Example:
    ids, learned = template.render(conversation, data.seq_len)
    truncated = len(ids) > data.seq_len
    if truncated and data.chat.too_long == "drop":
        raise Skipped(conversation.where, "too long", "over data.seq_len tokens")
    # each position predicts the next token; a cut example's last one predicts the first token cut off
    labels = np.where(learned[1:], ids[1:], IGNORE)[: data.seq_len]
    labels = np.append(labels, IGNORE) if not truncated else labels
    if not (labels != IGNORE).any():
        raise Skipped(conversation.where, "nothing to learn", "no learned token within data.seq_len")
    return Example(ids[: data.seq_len].astype(np.int32), labels.astype(np.int32), truncated)


def _prompt(conversation: Conversation, template: ChatTemplate) -> dict:
    """A held-out conversation's prompt, rendered as the model reads it before its reply."""
    question = conversation.prompt[-1]["content"]
    text = question if conversation.plain else template.text(conversation.prompt, conversation.where, True)
    return {"where": conversation.where, "question": question, "text": text}


def pack(examples: list[Example], seq_len: int, packing: bool, pad: int) -> dict[str, np.ndarray]:
    """The samples: several examples each (best-fit decreasing) or one each."""
    groups = best_fit_decreasing([len(e.ids) for e in examples], seq_len) if packing else \
        [[i] for i in range(len(examples))]
    return lay_out(examples, groups, seq_len, pad)


def lay_out(examples: list[Example], groups: list[list[int]], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """A sample per group of examples, in the group's order; the rest padding, not learned."""
    arrays = {"input_ids": np.full((len(groups), seq_len), pad, np.int32),
              "labels": np.full((len(groups), seq_len), IGNORE, np.int32),
              "position_ids": np.zeros((len(groups), seq_len), np.int32)}
    for row, group in enumerate(groups):
        at = 0
        for i in group:
            n = len(examples[i].ids)
            arrays["input_ids"][row, at:at + n] = examples[i].ids
            arrays["labels"][row, at:at + n] = examples[i].labels
            arrays["position_ids"][row, at:at + n] = np.arange(n)
            at += n
        arrays["position_ids"][row, at:] = np.arange(seq_len - at)  # padding: a document of its own
    return arrays


def _summary(examples: list[Example], arrays: dict[str, np.ndarray]) -> dict:
    real = sum(len(e.ids) for e in examples)
    return {"examples": len(examples), "truncated": sum(e.truncated for e in examples),
            "samples": len(arrays["input_ids"]), "tokens": real,
            "learned_tokens": int((arrays["labels"] != IGNORE).sum())}


def _describe(split: str, info: dict, seq_len: int) -> str:
    slots = info["samples"] * seq_len
    return (f"{split}: {info['examples']:,} conversations ({info['truncated']:,} cut to data.seq_len) in "
            f"{info['samples']:,} samples of {seq_len} tokens; "
            f"{info['tokens'] / slots:.1%} of tokens real (not padding), {info['learned_tokens'] / slots:.1%} "
            "learned")


def chat_fingerprint(data: DataConfig, tokenizer_hash: str, template: str) -> str:
    sources = [s for s in (*data.sources, data.validation) if s is not None]
    units = [[u.__dict__ for u in source_units(s)] for s in sources]
    settings = [data.seq_len, data.packing, data.validation_fraction, data.chat.model_dump(mode="json"),
                [s.model_dump() for s in sources]]
    return fingerprint(units, settings, tokenizer_hash, template)


@dataclass(frozen=True)
class ChatData(ArrayRecord, file="chat.json", format=1, what="chat data"):
    """Sample i of a split: {input_ids, labels, position_ids} tensors (`split`)."""

    ARRAYS, ROWS = ARRAYS, "samples"

    @property
    def prompts(self) -> list[dict]:
        return self.data["prompts"]

    def learned_tokens(self, split: str) -> np.ndarray:
        """The number of learned tokens of each sample."""
        return (self.split(split).array("labels") != IGNORE).sum(axis=1)

    def describe(self) -> list[str]:
        seq_len, left_out = self.data["seq_len"], self.data["left_out"]
        lines = [_describe(split, info, seq_len) for split, info in self.data["splits"].items()]
        return lines + ([describe_left_out(left_out)] if left_out else [])
