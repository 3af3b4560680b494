"""Live tensor memory on CPU, measured from Python's own objects: what tests/test_plan.py and
bench/memory_per_stage.py compare ZeRO's accounting with."""

from __future__ import annotations

import gc
import warnings
import weakref

import torch


def tensors() -> list[torch.Tensor]:
    """Every tensor reachable from Python, with the gradients attached to them (an autograd-set .grad has no Python
    object of its own until asked for)."""
    with warnings.catch_warnings():  # .grad of non-leaf tensors, deprecated torch attributes met by the scan
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"]
        return found + [t.grad for t in found if t.grad is not None]


class NewStorages:
    """Bytes of the distinct tensor storages that appeared after this was made. Tracked by identity rather than
    by subtracting a total: DeepSpeed's engines live on in reference cycles through autograd's C++ hooks after
    they are dropped, and are freed at some later point that must not count against the next measurement."""

    def __init__(self):
        gc.collect()
        self.before = [weakref.ref(t) for t in tensors()]

    def bytes(self) -> int:
        old = {t.untyped_storage().data_ptr() for t in (ref() for ref in self.before) if t is not None}
        new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors()}
        return sum(n for ptr, n in new.items() if ptr not in old)
