"""A split of fixed-shape examples saved as one .npy file per array (labelled texts, chat samples): written
durably with their sizes and checksums, served as tensors from memory maps."""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.files import file_sha256, write_durable


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
