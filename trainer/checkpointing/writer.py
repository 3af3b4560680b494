"""Writing a checkpoint's files, in the background while training goes on (checkpoint.async) or in place.

The engine hands every state dict it saves to this rank's `Writer` (DeepSpeed's through its checkpoint engine,
trainer/engine/checkpoint_engine.py), which takes each as a host copy (the only time the training loop stands
still: the live tensors change with the next step) and queues it to its thread, which serialises it with
torch.save, hashing the bytes as they are written, and fsyncs it. When every file of a rank is durable, the save
commits: the ranks gather their files' sizes and checksums over a group of their own, and rank 0 writes the
manifest, renames the folder and moves `latest` (trainer/checkpointing/store.py). Nothing else differs from a save in place: the same
files, the same bytes, the same atomicity. At most one save is in flight: the next waits for it, so the host
copy is bounded by one save's share of this rank's files.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("zerotrain")


class HostCopies:
    """Host copies of the state dicts of a save, in buffers kept for the next save: the copy is a memcpy into
    memory already mapped (a new allocation of GBs would fault in every page first), pinned when the tensors
    live on a GPU, and the host memory is bounded by one save's share of this rank's files. The buffers are
    reused only once the save that filled them has been written (the writer has one save in flight)."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.used: list[tuple] = []

    def begin(self) -> None:
        self.used = []

    def copy(self, obj, memo: dict | None = None):
        """Tensors become host copies; containers are copied through (their own type kept); anything else is
        deep-copied. Tensors shared within `obj` stay shared."""
        memo = {} if memo is None else memo
        if torch.is_tensor(obj):
            if id(obj) not in memo:
                memo[id(obj)] = self._buffer(obj)
            return memo[id(obj)]
        if isinstance(obj, dict):
            new = copy.copy(obj)  # an OrderedDict stays one, a defaultdict keeps its factory
            for key, value in obj.items():
                new[key] = self.copy(value, memo)
            return new
        if type(obj) in (list, tuple):
            return type(obj)(self.copy(value, memo) for value in obj)
        return copy.deepcopy(obj)

    def _buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (len(self.used), tuple(tensor.shape), tensor.dtype)
        self.used.append(key)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self.buffers[key] = buffer
        return buffer.copy_(tensor.detach())


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


class HashingFile:
    """A binary file that hashes what is written to it: a checkpoint is checksummed without reading it back."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class Writer:
    """This rank's checkpoint files: queued and written by a background thread (`asynchronous`), or written at
    once. A save is `begin`, one `add` per file, then `commit(finish)`, where `finish(digests)` runs (in the
    writer's thread) once this rank's files are durable, with their {name: {bytes, sha256}}."""

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self.zipfile = True  # torch.save's format; the engine's checkpoint engine sets its own
        self.tasks: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.folder: Path | None = None
        self.digests: dict[str, dict] = {}
        self.copies = HostCopies()
        self.copied_bytes = 0
        self.done: list[tuple[str, float, int]] = []  # committed saves not yet reported: (folder, seconds, bytes)
        if asynchronous:
            threading.Thread(target=self._work, name="zerotrain-checkpoint-writer", daemon=True).start()

    def begin(self, folder: Path) -> None:
        """A new save into `folder`; waits for the one in flight."""
        self.wait()
        self.folder, self.digests, self.copied_bytes, self.started = folder, {}, 0, time.perf_counter()
        self.copies.begin()

    def add(self, obj, path: Path) -> None:
        if self.asynchronous:
            obj = self.copies.copy(obj)
            self.copied_bytes += tensor_bytes(obj)
        self._run(self._write, obj, Path(path))

    def commit(self, finish: Callable[[dict], None]) -> None:
        self._run(self._commit, finish, self.folder, self.started)

    def wait(self) -> None:
        """Until the save in flight is committed; raises what failed in it."""
        self.tasks.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self, task, *args) -> None:
        if self.asynchronous:
            self.tasks.put((task, args))
        else:
            task(*args)

    def _work(self) -> None:
        while True:
            task, args = self.tasks.get()
            try:
                if self.error is None:  # after a failure the rest of that save is dropped: it never commits
                    task(*args)
            except BaseException as e:  # noqa: BLE001 - the main thread raises it at its next wait
                self.error = e
            finally:
                self.tasks.task_done()

    def _write(self, obj, path: Path) -> None:
        with open(path, "wb") as f:
            hashed = HashingFile(f)
            torch.save(obj, hashed, _use_new_zipfile_serialization=self.zipfile)
            f.flush()
            os.fsync(f.fileno())
        self.digests[str(path.relative_to(self.folder))] = {"bytes": hashed.bytes, "sha256": hashed.sha256.hexdigest()}

    def _commit(self, finish: Callable[[dict], None], folder: Path, started: float) -> None:
        finish(dict(self.digests))
        self.done.append((folder.name, time.perf_counter() - started, sum(d["bytes"] for d in self.digests.values())))
