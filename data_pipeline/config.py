"""Typed `tokenizer:` and `data:` config sections. Shapes and ranges only: files are checked by prepare."""
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticUndefined

NAME = r"^[A-Za-z0-9._-]+$"

# What a resumed run may do with a config field (trainer.config.resume_changes reads them): FIXED - keep the
# checkpoint's value; MAY_CHANGE - set anew; DATA - what the data is, judged by the prepared data's fingerprint
# (the same data may be described differently: moved, another spelling of a path). A section declares the policy
# of its fields in RESUME; a field declares its own with `on_resume`.
FIXED, MAY_CHANGE, DATA = "fixed", "may_change", "data"


def on_resume(policy: str, default: Any = PydanticUndefined, **kwargs) -> Any:
    """A pydantic Field that declares what a resumed run may do with it."""
    return Field(default, json_schema_extra={"on_resume": policy}, **kwargs)


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False, use_attribute_docstrings=True)
    RESUME: ClassVar[str] = DATA

    path: Path | None = None
    """an existing HF tokenizer folder to use instead of training one"""
    vocab_size: int = Field(8192, ge=256, le=1_000_000)
    """byte-level BPE trained on the train split"""
    train_sample_bytes: int = Field(64 * 2**20, gt=0)
    """train the BPE on at most this much text"""


class SourceConfig(BaseModel):
    """One corpus of a mixture. A plain string in `data.sources` is a source with only `path` set."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False, use_attribute_docstrings=True)

    path: str | None = None
    """files or globs (.txt, .json, .jsonl, .parquet, .csv), or a save_to_disk folder"""
    hub: str | None = None
    """a Hugging Face Hub dataset name, read as a stream (needs the internet)"""
    hub_config: str | None = None
    """the Hub dataset's configuration name, if it has several"""
    split: str = "train"
    """the Hub or save_to_disk split to read"""
    name: str | None = Field(None, pattern=NAME)
    """names the source in logs and folders; derived if unset"""
    text_field: str | None = None
    """column holding the text; data.text_field if unset"""
    weight: float | None = Field(None, gt=0)
    """share of training samples relative to the other sources' weights; with no weights anywhere, sources are
    sampled in proportion to their size (concatenated)"""

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (local files) or `hub` (a Hub dataset name)")
        if self.name is None:
            self.name = _derived_name(self.path or self.hub)
        return self


class ChatConfig(BaseModel):
    """How chat examples are read and learned (model.task sft; data_pipeline.chat)."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False, use_attribute_docstrings=True)

    messages_field: str = "messages"
    """conversational rows: a list of turns (e.g. ShareGPT's "conversations")"""
    role_field: str = "role"
    """in each turn (ShareGPT: "from")"""
    content_field: str = "content"
    """in each turn (ShareGPT: "value")"""
    roles: dict[str, str] = {}
    """the data's role names -> the template's (ShareGPT: {human: user, gpt: assistant})"""
    prompt_field: str = "prompt"
    """prompt/completion rows (TRL's names): plain strings or lists of turns"""
    completion_field: str = "completion"
    """the completion of prompt/completion rows"""
    train_on: Literal["assistant", "last_assistant", "completion"] = "assistant"
    """the tokens learned: every assistant turn, the last one, or the completion (of a conversation: its last
    reply)"""
    template: Path | None = None
    """a Jinja chat template file to use instead of the tokenizer's"""
    too_long: Literal["truncate", "drop"] = "truncate"
    """an example over data.seq_len tokens: cut, or left out"""
    skip_invalid: bool = False
    """a row the template cannot train on (empty turn, no assistant turn, a render failure): refused (one line
    naming it), or left out and counted"""
    sample_prompts: int = Field(2, ge=0, le=16)
    """held-out prompts answered at each validation (TensorBoard text)"""
    sample_tokens: int = Field(48, ge=1, le=1024)
    """the most tokens of each of those replies"""


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False, use_attribute_docstrings=True)
    RESUME: ClassVar[str] = DATA

    sources: list[SourceConfig] = Field(min_length=1)
    """weighted mixture; one source needs no weight"""
    text_field: str = "text"
    """column holding the text in json/jsonl/parquet/csv sources"""
    mode: Literal["prepared", "streaming"] = on_resume(FIXED, "prepared")
    """streaming: tokenize on the fly, no prepare step"""
    prepared_dir: Path = on_resume(MAY_CHANGE)
    """where tokenizer, shards and manifest.json go"""
    seq_len: int = on_resume(FIXED, ge=8)
    """tokens per sample: the run's position in the data counts samples of it"""
    validation_fraction: float = Field(0.05, gt=0, lt=0.5)
    """of documents, chosen by hashing their key"""
    shard_tokens: int = Field(128 * 2**20, ge=1024)
    """tokens per shard file (256 MiB at uint16)"""
    num_workers: int = on_resume(MAY_CHANGE, 1, ge=0)
    """DataLoader worker processes per rank"""
    document_masking: bool = on_resume(FIXED, False)
    """Packed samples hold several documents (eos after each). true: each is trained as if alone - positions
    restart and attention stops at every eos. false: a sample is one stream, attending across documents."""
    label_field: str = "label"
    """Labelled data (model.task: classification), each text one example padded/truncated to seq_len tokens: the
    column holding the label (strings, or ints standing for themselves)"""
    labels: list[str] | None = Field(None, min_length=2)
    """the labels to train on, in id order; rows with other labels are left out (and counted). Unset: every label
    of the training split, sorted."""
    validation: SourceConfig | None = None
    """given validation split; unset: validation_fraction of the train source"""
    test: SourceConfig | None = None
    """given test split; unset: test_fraction of the train source"""
    test_fraction: float = Field(0.1, ge=0, lt=0.5)
    """of labelled train rows held out for the final test"""
    truncation: Literal["head", "tail", "head+tail"] = "head"
    """a labelled text over seq_len tokens keeps its start, its end, or both (a quarter from the start)"""
    chat: ChatConfig = ChatConfig()
    """chat data (model.task: sft): field and role names, what is learned"""
    packing: bool = on_resume(FIXED, True)
    """sft: several conversations per sample (best-fit decreasing, kept apart) or one each, padded"""

    @field_validator("validation", "test", mode="before")
    @classmethod
    def _plain_path(cls, source):
        return {"path": source} if isinstance(source, str) else source

    @field_validator("sources", mode="before")
    @classmethod
    def _plain_paths(cls, sources):
        return [{"path": s} if isinstance(s, str) else s for s in sources] if isinstance(sources, list) else sources

    @field_validator("sources")
    @classmethod
    def _distinct_names_and_weights(cls, sources: list[SourceConfig]):
        names = [s.name for s in sources]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two sources are named {name!r}; give them distinct `name`s")
        if len({s.weight is None for s in sources}) > 1:
            raise ValueError("give every source a `weight`, or none (then each is sampled in proportion to its size)")
        return sources

    def text_field_of(self, source: SourceConfig) -> str:
        return source.text_field or self.text_field


def _derived_name(origin: str) -> str:
    """'data/shakespeare/*_gut.txt' -> 'shakespeare', 'web/part-*.jsonl' -> 'web', 'org/books' -> 'books'."""
    parts = [p for p in Path(origin).parts if not re.search(r"[*?\[]", p)]
    last = parts[-1] if parts else "source"
    name = Path(last).stem if last == Path(origin).name else last  # a glob's name is its folder's
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "source"
