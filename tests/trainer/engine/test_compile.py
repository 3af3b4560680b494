"""train.compile: the compiled model and loss train the losses of eager runs at every ZeRO stage, also resumed from
an eager run's checkpoint; what compiling cost and where dynamo broke the graph are logged, and compiling is not
counted as training time."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import as_of_step_6, read_metrics, resumed_like, tiny_args, train_losses, zerotrain


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # 2: resumed compiled, below; 0 and 1 compile the module as 2 does
def test_a_compiled_run_trains_the_losses_of_an_eager_one(stage, tiny_run, tiny_data, tmp_path):
    """tiny_run (ZeRO 2, eager) is what each stage compiled trains: fp32, within the last digits of reordered sums.
    Stage 3's parameter hooks break the graph (DeepSpeed marks them not to be compiled): counted and named."""
    run_dir = tmp_path / f"compiled{stage}"
    zerotrain("train", *tiny_args(run_dir, tiny_data, f"zero.stage={stage}", "train.compile=true", "eval.every=0",
                                  "checkpoint.every=0"))
    assert train_losses(run_dir) == pytest.approx(train_losses(tiny_run), rel=1e-5, abs=1e-6)
    validation = [[r["val/loss"] for r in read_metrics(run) if "val/loss" in r][-1] for run in (run_dir, tiny_run)]
    assert validation[0] == pytest.approx(validation[1], rel=1e-5)  # the eval-mode graph, compiled at the end
    log = (run_dir / "logs" / "rank0.log").read_text()
    last = [r for r in read_metrics(run_dir) if "compile/seconds" in r][-1]
    assert "compiled in" in log and last["compile/seconds"] > 0 and last["compile/graphs"] >= 2
    assert (last["compile/graph_breaks"] > 0) == (stage == 3) == ("graph break x" in log)
    if stage == 3:  # each reason once, in dynamo's words, with its count
        hook = r"graph break x\d+: Skip calling function .*_pre_forward_module_hook.*torch.compiler.disable"
        assert re.search(hook, log)
    first = read_metrics(run_dir)[0]  # step 1, which compiled: its time without the compiling
    assert first["step"] == 1 and first["perf/step_s"] < first["compile/seconds"], first


@pytest.mark.slow
def test_an_eager_run_resumes_compiled_and_exports_its_model(tiny_run, tiny_data, tmp_path):
    """Compiling is a speed switch, not another experiment: tiny_run's step-6 checkpoint continues compiled (ZeRO 2)
    to its losses, and the compiled run's checkpoint exports tiny_run's model (the module's own parameter names)."""
    run_dir = as_of_step_6(tiny_run, tmp_path / "resumed")
    zerotrain("train", *tiny_args(run_dir, tiny_data, "train.compile=true"), "--resume", "auto")
    assert resumed_like(run_dir, tiny_run, 1e-5) and "compiled in" in (run_dir / "logs" / "rank0.log").read_text()
    ids, logits = torch.arange(1, 20).unsqueeze(0), []
    for run, out in ((run_dir, tmp_path / "compiled"), (tiny_run, tmp_path / "eager")):
        zerotrain("export", run, out)
        logits.append(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
