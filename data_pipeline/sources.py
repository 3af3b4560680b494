"""Find what a source holds and stream its documents with `datasets`, one (key, text) pair per document.

A source is read in units: each local file, a `save_to_disk` folder, or a Hub dataset. Units are what
preparation groups into chunks (its unit of parallel work and of resuming).
"""
import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError

# `datasets` builder per file extension, with its options. sample_by="document": one text file is one document.
BUILDERS = {
    ".txt": ("text", {"sample_by": "document"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
}
COMPRESSIONS = (".bz2", ".gz", ".xz", ".zst")
# datasets logs a JSON parse failure itself before raising it; the DataError naming file and line replaces both.
logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)  # `datasets` decompresses these itself: data.csv.bz2 is a csv
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")  # what `save_to_disk` leaves in a folder


@dataclass(frozen=True)
class Unit:
    kind: str  # "file", "disk" (a save_to_disk folder) or "hub"
    location: str
    bytes: int  # size on disk; 0 for the Hub, whose size is unknown before reading
    mtime_ns: int


def source_units(source: SourceConfig) -> list[Unit]:
    if source.hub is not None:
        return [Unit("hub", source.hub, 0, 0)]
    path = os.path.expanduser(source.path)
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS):
        folder = Path(path).resolve()
        files = [f for f in folder.rglob("*") if f.is_file()]
        return [Unit("disk", str(folder), sum(f.stat().st_size for f in files),
                     max(f.stat().st_mtime_ns for f in files))]
    files = sorted({Path(p).resolve() for p in glob.glob(path, recursive=True) if os.path.isfile(p)})
    if not files:
        raise DataError(f"data.sources: {source.path!r} matches no file (nor a save_to_disk folder)")
    for file in files:
        builder_for(file)  # an unreadable type fails now, not after the tokenizer has been trained
    return [Unit("file", str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def iter_texts(units: list[Unit], source: SourceConfig, text_field: str) -> Iterator[str]:
    """The non-empty documents of the units, in order."""
    for group in _read_groups(units):
        rows, field = _open(group, source, text_field)
        for i, row in enumerate(_named_errors(rows, [u.location for u in group])):
            text = row.get(field)
            if not isinstance(text, str):
                problem = f"has no {field!r} field (data.text_field)" if text is None else \
                    f"field {field!r} is {type(text).__name__}, not text"
                raise DataError(f"{group[0].location}: row {i} {problem}")
            if text:
                yield text


def iter_rows(source: SourceConfig) -> Iterator[tuple[str, int, dict]]:
    """Every row of a source with columns (csv, json, parquet, a save_to_disk folder, the Hub), with where it
    comes from: (file or dataset, row number, row)."""
    for unit in source_units(source):
        rows, _ = _open([unit], source, "")
        for i, row in enumerate(_named_errors(rows, [unit.location])):
            yield unit.location, i, row


def _named_errors(rows, locations: list[str]) -> Iterator[dict]:
    """The rows of a stream over `locations`; a file that cannot be parsed ends it with a one-line DataError
    naming the file (and for JSON lines the line), not the parser's traceback."""
    try:
        yield from rows
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow, pandas, json, codecs: whatever a bad file makes them raise
        raise unreadable(locations, e) from None


def unreadable(locations: list[str], error: Exception) -> DataError:
    for location in locations:
        problem = file_problem(Path(location))
        if problem:
            return DataError(f"{location}: {problem}")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"{locations[0] if len(locations) == 1 else f'one of {len(locations)} files'}: cannot be read "
                     f"({type(error).__name__}: {first[:200]})")


def file_problem(path: Path) -> str | None:
    """What is wrong with a file's bytes, if anything: not text, or (JSON lines) the first line that is not JSON."""
    kind = builder_for(path)[0] if path.is_file() else None
    if kind not in ("text", "json", "csv") or path.suffix.lower() in COMPRESSIONS:
        return None
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"not UTF-8 text (line {number}, byte 0x{line[e.start]:02x}): a binary file?"
            if kind == "json" and path.suffix.lower() == ".jsonl" and text.strip():
                try:
                    json.loads(text)
                except ValueError as e:
                    return f"line {number} is not valid JSON ({e.msg})"
    return None


def _read_groups(units: list[Unit]) -> Iterator[list[Unit]]:
    """Plain text files are read many per `load_dataset` call: per call costs ~0.1 s, a whole play's worth.
    Files with rows are read one per call, so an error can name its file."""
    texts = [u for u in units if u.kind == "file" and builder_for(Path(u.location))[0] == "text"]
    if texts:
        yield texts
    yield from ([u] for u in units if u not in texts)


def _open(units: list[Unit], source: SourceConfig, text_field: str):
    """Rows as a stream, and the field holding the text."""
    import datasets  # here: finding a source's files (a run's pre-flight) needs none of it

    unit = units[0]
    try:
        if unit.kind == "hub":
            return datasets.load_dataset(unit.location, source.hub_config, split=source.split, streaming=True), text_field
        if unit.kind == "disk":
            saved = datasets.load_from_disk(unit.location)
            saved = saved[source.split] if isinstance(saved, datasets.DatasetDict) else saved
            return saved.to_iterable_dataset(), text_field
    except (OSError, ValueError, KeyError, ConnectionError) as e:
        raise DataError(f"data.sources: cannot read {unit.location!r} ({str(e).splitlines()[0]})") from None
    builder, _ = builder_for(Path(unit.location))
    return stream_files([u.location for u in units]), ("text" if builder == "text" else text_field)


def stream_files(locations: list[str]):
    """Local files of one type as one `datasets` IterableDataset."""
    import datasets

    builder, options = builder_for(Path(locations[0]))
    # datasets reads data_files as glob patterns: a file named a[1].txt would match a1.txt, or nothing
    return datasets.load_dataset(builder, data_files=[glob.escape(location) for location in locations],
                                 split="train", streaming=True, **options)


def builder_for(file: Path) -> tuple[str, dict]:
    kind = file.suffix.lower()
    if kind in COMPRESSIONS:
        kind = Path(file.stem).suffix.lower()
    try:
        return BUILDERS[kind]
    except KeyError:
        raise DataError(f"{file}: unsupported file type (use one of {', '.join(BUILDERS)}, optionally "
                        f"compressed: {', '.join(COMPRESSIONS)})") from None
