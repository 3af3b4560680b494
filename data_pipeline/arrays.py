"""Splits of fixed-shape examples saved as one .npy file per array (labelled texts, chat samples): written
durably with their sizes and checksums, recorded (`ArrayRecord`), served as tensors from memory maps."""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.files import file_sha256, write_durable
from data_pipeline.record import DataFile, PreparedRecord


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each array as folder/NAME.npy; returns each file's size and SHA-256 (for the record)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        path = folder / f"{name}.npy"
        write_durable(path, lambda f, a=array: np.save(f, a))
        files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


class ArraySplit(Dataset):
    """Example i as a dict of int64 tensors, one per array. The arrays are memory-mapped on first use, not read
    whole, and not pickled: a DataLoader worker receives the folder and maps them itself."""

    def __init__(self, folder: Path, length: int, names: tuple[str, ...]):
        self.folder, self.length, self.names = folder, length, names
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {n: np.load(self.folder / f"{n}.npy", mmap_mode="r") for n in self.names}
        return self._arrays[name]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} outside [0, {len(self)})")
        return {name: torch.as_tensor(np.asarray(self.array(name)[i], np.int64)) for name in self.names}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}


@dataclass(frozen=True)
class ArrayRecord(PreparedRecord):
    """A record whose splits are folders of arrays: data["splits"][split] holds the split's row count (under
    ROWS) and its files' sizes and checksums (under "files")."""

    ARRAYS: ClassVar[tuple[str, ...]]  # the arrays of every split
    ROWS: ClassVar[str]  # the key of a split's number of rows

    @property
    def fingerprint(self) -> str:
        return self.data["inputs_fingerprint"]

    def rows(self, split: str) -> int:
        return self.data["splits"][split][self.ROWS]

    def files(self) -> list[DataFile]:
        return [DataFile(self.dir / split / f"{name}.npy", file["bytes"], file["sha256"])
                for split, info in self.data["splits"].items() for name, file in info["files"].items()]

    def split(self, name: str) -> ArraySplit:
        """Row i as a dict of tensors, one per array."""
        return ArraySplit(self.dir / name, self.rows(name), self.ARRAYS)
