"""Repairs of DeepSpeed (the version trainer/engine names), each for a measured fault, each removable on its
own when a DeepSpeed release fixes it. The optimizer's hyper-parameters after a load are not a repair: a
resumed engine always takes them from the config (DeepSpeedEngine.load)."""

from __future__ import annotations

import torch


def zero3_universal_step_tensors(engine) -> None:
    """DeepSpeed's ZeRO-3 universal load gives all parameter groups one shared Adam step tensor, which each
    group's update then increments: the bias correction runs ahead (measured: loss drift 4e-3 three steps after
    resuming). Each group gets its own copy. (The same load also copies group 0's weight decay onto every group,
    which DeepSpeedEngine.load sets from the config again.)"""
    optimizer = engine.optimizer
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def exclude_frozen_under_every_name(engine) -> None:
    """DeepSpeed's module_state_dict(exclude_frozen_parameters=True) drops a frozen parameter under the one name
    named_parameters() lists, and nothing that comes with it: a tied one (a LoRA run's output layer, which is
    its input embedding) stays in every checkpoint under its other name (measured: SmolLM2's 56.6 MB lm_head in
    each LoRA checkpoint), as does a 4-bit weight's quantization state (absmax, quant_map: `weight.` keys). The
    engine's module_state_dict drops them all."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            frozen = tuple(name for name, p in engine.module.named_parameters(remove_duplicate=False)
                           if not p.requires_grad)
            for key in [key for key in state if key in frozen or key.startswith(tuple(f"{n}." for n in frozen))]:
                del state[key]
        return state

    engine.module_state_dict = module_state_dict


def output_recorders_by_class_name() -> None:
    """AutoEP (expert parallelism) re-points transformers' recorder of router logits at its own router through
    transformers' registry of output recorders, calling `registry.get(key, default)` with a class name as the
    key; transformers 5.24's registry takes a model, not a name, and no default (measured: `TypeError:
    _CanRecordRegistry.get() takes 2 positional arguments but 3 were given` at deepspeed.initialize). Its `get`
    accepts both again; a model still looks up its class's entry as before. Idempotent."""
    from transformers.utils import output_capturing

    registry = output_capturing._CanRecordRegistry
    if getattr(registry.get, "accepts_names", False):
        return
    by_model = registry.get

    def get(self, key, default=None):
        return dict.get(self, key, default) if isinstance(key, str) else by_model(self, key)

    get.accepts_names, get.original = True, by_model
    registry.get = get
