"""The record that prepare writes last into data.prepared_dir (manifest.json for packed shards, labelled.json for
labelled examples): its presence means the data is complete, and it lists every data file with its size and
SHA-256, so that a run can check the files before it starts and verify their bytes while it trains."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from data_pipeline.errors import DataError
from data_pipeline.files import file_sha256


@dataclass(frozen=True)
class DataFile:
    path: Path
    bytes: int
    sha256: str


@dataclass(frozen=True)
class PreparedRecord:
    """A subclass names its record: `class Manifest(PreparedRecord, file="manifest.json", format=3, what=...)`."""

    FILE: ClassVar[str]  # the record's file name in prepared_dir
    FORMAT: ClassVar[int]  # bumped whenever what prepare writes changes
    WHAT: ClassVar[str]  # for messages: "prepared data", "labelled data"

    dir: Path
    data: dict  # the parsed record

    def __init_subclass__(cls, file: str | None = None, format: int | None = None, what: str | None = None,
                          **kwargs):
        super().__init_subclass__(**kwargs)
        if file is not None:  # an intermediate base names no record
            cls.FILE, cls.FORMAT, cls.WHAT = file, format, what

    @classmethod
    def load(cls, prepared_dir: str | Path):
        path = Path(prepared_dir) / cls.FILE
        if not path.is_file():
            raise DataError(f"data.prepared_dir: no {cls.WHAT} at {prepared_dir} ({cls.FILE} missing); run "
                            "`zerotrain prepare CONFIG`")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); prepare the data again") from None
        if not isinstance(record, dict) or record.get("format") != cls.FORMAT:
            found = record.get("format") if isinstance(record, dict) else None
            raise DataError(f"{path}: format {found!r}, this zerotrain reads format {cls.FORMAT}; prepare the "
                            "data again")
        return cls(Path(prepared_dir), record)

    @property
    def fingerprint(self) -> str:
        """Identity of what a model trains on (inputs and tokenizer), recorded in checkpoints."""
        raise NotImplementedError

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def files(self) -> list[DataFile]:
        """Every data file with its recorded size and checksum."""
        raise NotImplementedError

    def check_sizes(self) -> None:
        """Cheap, before a run starts: every data file is there with its recorded size."""
        for file in self.files():
            check_size(file)

    def verify(self) -> None:
        """Every data file has its recorded size and checksum."""
        for file in self.files():
            verify_file(file)


def check_size(file: DataFile) -> None:
    if not file.path.is_file():
        raise DataError(f"{file.path}: missing; prepare the data again")
    size = file.path.stat().st_size
    if size != file.bytes:
        raise DataError(f"{file.path}: truncated or wrong size ({size} bytes, expected {file.bytes}); prepare "
                        "the data again")


def verify_file(file: DataFile) -> None:
    check_size(file)
    if file_sha256(file.path) != file.sha256:
        raise DataError(f"{file.path}: checksum mismatch, the file is corrupt; prepare the data again")
