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
