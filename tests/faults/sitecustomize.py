"""Fault injection for tests: a test that puts this folder on PYTHONPATH has every Python process of its run (the
launcher, each rank) load it at start-up. ZEROTRAIN_FAULT_NAN_AFTER=N: every cross-entropy after a process's Nth
is NaN - a loss that diverges, reaching the loop as a real divergence does (the optimizer's limits on the
learning rate keep a run from being made to diverge on purpose)."""

import os

if "ZEROTRAIN_FAULT_NAN_AFTER" in os.environ:
    import torch.nn.functional as F

    _after, _calls, _cross_entropy = int(os.environ["ZEROTRAIN_FAULT_NAN_AFTER"]), [0], F.cross_entropy

    def _diverging(*args, **kwargs):
        _calls[0] += 1
        loss = _cross_entropy(*args, **kwargs)
        return loss * float("nan") if _calls[0] > _after else loss

    F.cross_entropy = _diverging
