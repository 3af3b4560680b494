"""Find the source files and stream their documents with `datasets`, one (key, text) pair per document."""
import glob
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # sources are local files: never let `datasets` reach the Hub
import datasets  # noqa: E402

from data_pipeline.errors import DataError  # noqa: E402

# `datasets` builder per file extension, with its options. sample_by="document": one text file is one document.
BUILDERS = {
    ".txt": ("text", {"sample_by": "document"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
}


def resolve_files(sources: list[str]) -> list[Path]:
    files = set()
    for pattern in sources:
        matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matches:
            raise DataError(f"data.sources: {pattern!r} matches no file")
        files.update(p.resolve() for p in matches)  # resolved, so one file named two ways is read once
    for file in files:
        _builder(file)  # an unreadable type fails now, not after the tokenizer has been trained
    return sorted(files)


def iter_documents(files: list[Path], text_field: str) -> Iterator[tuple[str, str]]:
    for file in files:
        builder, options = _builder(file)
        rows = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True, **options)
        field = "text" if builder == "text" else text_field
        for i, row in enumerate(rows):
            text = row.get(field)
            if text is None:
                raise DataError(f"{file}: row {i} has no {field!r} field (data.text_field)")
            if not isinstance(text, str):
                raise DataError(f"{file}: row {i} field {field!r} is {type(text).__name__}, not text")
            if text:
                # The file name, not its full path, keys the document: the train/validation split it
                # decides must not change with where the corpus is checked out. (Equal names in two
                # folders give equal keys, which only puts those documents in the same split.)
                yield f"{file.name}:{i}", text


def _builder(file: Path) -> tuple[str, dict]:
    try:
        return BUILDERS[file.suffix.lower()]
    except KeyError:
        raise DataError(f"{file}: unsupported file type (use one of {', '.join(BUILDERS)})") from None
