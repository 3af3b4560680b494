"""DeepSpeed's checkpoint engine for saves through zerotrain's checkpoint writer (trainer/checkpointing/writer.py):
DeepSpeed's `save_checkpoint` hands it every state dict it saves; it queues each to the writer, which takes a host
copy and writes it (in the background when saves are asynchronous). Loads are DeepSpeed's own."""

from __future__ import annotations

from pathlib import Path

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine


class SnapshotEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine for saves through a `Writer`; loads as DeepSpeed's own engine does.
    Assigned to `engine.checkpoint_engine`, which save_checkpoint reads on every call."""

    def __init__(self, original: CheckpointEngine, writer):
        super().__init__()
        self.name, self.original, self.writer = "zerotrain-snapshot", original, writer
        writer.zipfile = getattr(original, "zipfile_serialization", False)  # DeepSpeed's format for every file

    @classmethod
    def around(cls, current: CheckpointEngine, writer) -> "SnapshotEngine":
        """The engine to assign for saves through `writer`, in place of `current` (DeepSpeed's, or one of these)."""
        return cls(getattr(current, "original", current), writer)

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.writer.add(state_dict, Path(path))

    def load(self, path: str, map_location=None):
        return self.original.load(path, map_location)

    def commit(self, info) -> bool:
        return True  # zerotrain commits a save itself, when every rank's files are durable
