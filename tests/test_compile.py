"""train.compile: the compiled model and loss train the losses of eager runs at every ZeRO stage, also resumed from
an eager run's checkpoint; what compiling cost and where dynamo broke the graph are logged, and compiling is not
counted as training time."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import as_of_step_6, read_metrics, resumed_like, tiny_args, train_losses, zerotrain
from trainer import compilation
from trainer.monitors import Window


def test_graph_breaks_are_counted_with_their_reason():
    def twice(x):
        print("a graph break")
        return x * 2

    torch._dynamo.reset()
    before = compilation.graph_breaks()
    torch.compile(twice)(torch.ones(3))
    reasons = {reason: count - before.get(reason, 0) for reason, count in compilation.graph_breaks().items()
               if count > before.get(reason, 0)}
    assert reasons == {next(r for r in reasons if "print" in r): 1}, reasons
    assert "graph break x1: " in compilation.describe()


def test_compiling_is_not_counted_as_training_time():
    started, before = time.perf_counter(), compilation.seconds()
    window = Window(torch.device("cpu"))
    torch.compile(lambda x: (x.sin() + 1).sum())(torch.randn(8))  # traced here (compiled, or from the cache)
    window.add(torch.ones(()))
    _, steps, seconds = window.flush(mean=lambda values: values)
    wall, compiling = time.perf_counter() - started, compilation.seconds() - before
    assert steps == 1 and compiling > 0 and seconds <= wall - compiling, (seconds, wall, compiling)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])  # 2: resumed compiled, below; 1 compiles as 2 does
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
