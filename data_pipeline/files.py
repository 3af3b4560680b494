"""File primitives every layer uses: durable all-or-nothing writes, checksums and fingerprints.

They live in the lowest layer so that prepared data, checkpoints and the launcher's own files are written,
hashed and identified one way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

HASH_BLOCK = 16 * 2**20


def write_durable(path: Path, content: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Write to a temporary name beside `path`, fsync, rename over `path`, fsync the folder: a reader sees the
    old file or the whole new one, and after a crash the new one is on disk. A failed write (a full disk)
    leaves nothing behind. `content` is text, bytes, or a function that writes into the open binary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never share it
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folder itself (also on a shared filesystem)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def file_sha256(path: Path) -> str:
    """Read sequentially in blocks (not through a random-access map): fast, and flat in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts) -> str:
    """The identity of JSON-like values (strings, numbers, lists, dicts; paths as text), independent of dict order."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def share(items: list, rank: int, world_size: int, size=None) -> list:
    """Rank `rank`'s share of work items split over `world_size` ranks: every world_size-th, or with `size`
    (item -> bytes) the largest first, each to the least loaded rank (an embedding dwarfs a norm)."""
    if size is None:
        return items[rank::world_size]
    loads, mine = [0] * world_size, []
    for item in sorted(items, key=size, reverse=True):
        owner = loads.index(min(loads))
        loads[owner] += size(item)
        if owner == rank:
            mine.append(item)
    return mine


def full_disk(path: Path) -> bool:
    """Whether the disk holding `path` (or its nearest existing parent) is full: less than 1 MiB or 0.5% free.
    A full disk is not always reported as ENOSPC (numpy and torch's writers raise their own errors)."""
    folder = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("/"))
    usage = shutil.disk_usage(folder)
    return usage.free <= max(2**20, usage.total // 200)
