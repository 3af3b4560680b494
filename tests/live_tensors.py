"""Live tensor memory on CPU, measured from Python's own objects: what tests/launcher/test_plan.py,
tests/trainer/parallel/test_sequence.py and the memory benchmarks compare zerotrain's memory model with."""

from __future__ import annotations

import gc
import warnings
import weakref
from functools import partial
from pathlib import Path

import torch

from ranks import join, spawn, write_result


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
        gc.collect()  # a tensor in uncollected garbage (a temporary caught in a reference cycle) is not alive
        old = {t.untyped_storage().data_ptr() for t in (ref() for ref in self.before) if t is not None}
        new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors()}
        return sum(n for ptr, n in new.items() if ptr not in old)


def kept_for_backward(model, run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` runs a forward of `model` and its loss, plus
    what is alive around the loss without being saved: the model's output logits and the tensors `run`
    returns. The activations a memory model counts; the parameters are not activations."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, logits: pack(logits))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        alive = run() or []
    hook.remove()
    for t in alive:
        pack(t)
    return sum(kept.values())


def split_activations(config: Path, overrides: list[str], ranks: int, masking: bool, seq_len: int,
                      split: str = "sequence") -> dict:
    """{measured, estimated}: the activations of one sample of `seq_len` tokens (random, eos every ~200) kept
    by rank 0 of `ranks` gloo ranks sharing it (`split`: parallel.sequence or parallel.tensor), and what
    trainer/memory.py estimates for a rank; with the tensor split also the parameter bytes a rank holds
    ({params_measured, params_estimated})."""
    overrides = [*overrides, f"data.document_masking={str(masking).lower()}", f"data.seq_len={seq_len}",
                 "train.micro_batch_size=1", f"train.global_batch_size={1 if split == 'tensor' else ranks}",
                 f"launch.nproc_per_node={ranks}", f"parallel.{split}={ranks}"]
    return spawn(_split_rank, ranks, str(config), overrides)[0]


def _split_rank(rank: int, ranks: int, port: int, config: str, overrides: list[str], out: str) -> None:
    join(rank, ranks, port)
    import deepspeed
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.engine.deepspeed_config import deepspeed_config
    from trainer.memory import activation_bytes, architecture, document_mask_bytes
    from trainer.model.build import model_config
    from trainer.parallel.sequence import setup
    from trainer.tasks.causal_lm import lm_loss

    cfg, vocab, eos = load_config(config, overrides), 8192, 0
    seq_len, sequence, tensor = cfg.data.seq_len, cfg.parallel.sequence, cfg.parallel.tensor
    shard = setup(model_config(cfg.model, vocab), cfg.layout, 1, seq_len, cfg.data.document_masking)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(cfg.model, vocab))
    arch = architecture(cfg, vocab)
    if tensor > 1:  # AutoTP slices the model when DeepSpeed's engine is built
        model = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                     config=deepspeed_config(cfg, arch.held(tensor)))[0].module
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(1, vocab, (1, seq_len + 1), generator=generator)
    batch[torch.rand(batch.shape, generator=generator) < 1 / 200] = eos
    loss = partial(lm_loss, model, batch, eos if cfg.data.document_masking else None, shard)
    measured = kept_for_backward(model, lambda: [loss()])  # fp32: the logits need no copy for the loss
    estimated = activation_bytes(arch, cfg.train.precision, 1, seq_len // sequence, tensor=tensor) \
        + document_mask_bytes(cfg, arch)
    params = {"params_measured": sum(4 * p.numel() for p in model.parameters()), "params_estimated": 4 *
              arch.held(tensor)}
    write_result(out, rank, {"measured": measured, "estimated": estimated} | params)
