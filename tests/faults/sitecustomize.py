"""Fault injection for tests: a test that puts this folder on PYTHONPATH has every Python process of its run (the
launcher, each rank) load it at start-up. ZEROTRAIN_FAULT_NAN_AFTER=N: every cross-entropy after a process's Nth
is NaN - a loss that diverges, reaching the loop as a real divergence does (the optimizer's limits on the
learning rate keep a run from being made to diverge on purpose). ZEROTRAIN_FAULT_SLOW=S: every cross-entropy
first sleeps S seconds - steps slow enough for a test to act between two of them."""

import os

if "ZEROTRAIN_FAULT_NAN_AFTER" in os.environ:
    import torch.nn.functional as F

    _after, _calls, _cross_entropy = int(os.environ["ZEROTRAIN_FAULT_NAN_AFTER"]), [0], F.cross_entropy

    def _diverging(*args, **kwargs):
        _calls[0] += 1
        loss = _cross_entropy(*args, **kwargs)
        return loss * float("nan") if _calls[0] > _after else loss

    F.cross_entropy = _diverging

if "ZEROTRAIN_FAULT_SLOW" in os.environ:
    import time

    import torch.nn.functional as F

    _pause, _inner = float(os.environ["ZEROTRAIN_FAULT_SLOW"]), F.cross_entropy

    def _slow(*args, **kwargs):
        time.sleep(_pause)
        return _inner(*args, **kwargs)

    F.cross_entropy = _slow
