"""`zerotrain report`: a run's metrics.jsonl drawn to a PNG, panels only for the metrics it has; several runs in
one figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from data_pipeline.errors import UserError
from helpers import read_metrics, zerotrain
from trainer.observe.report import PANELS, _draw, _name, compare, panels, render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GPU_MEMORY = {"mem/allocated_gib": 3.1, "mem/reserved_gib": 4.0, "mem/peak_allocated_gib": 3.6}


def records(steps: int = 30, memory: dict | None = None, mfu: bool = True, extra_val: dict | None = None) \
        -> list[dict]:
    """Records as trainer/train.py writes them: a train record per logged step, then at eval steps a
    validation record and after saves a checkpoint record, all with the same step."""
    out = []
    for step in [1, *range(5, steps + 1, 5)]:
        out.append({"step": step, "time": 1.7e9 + step, "train/loss": 9 - 4 * (1 - math.exp(-step / 10)),
                    "train/lr": 1e-3 * min(1, step / 10), "train/grad_norm": 4 / step ** 0.5,
                    "train/tokens_seen": 512 * step, "perf/tokens_per_s": 2000 + step,
                    "perf/step_s": 0.25, **({"perf/mfu": 0.031} if mfu else {}),
                    **(memory if memory is not None else {"mem/rss_gib": 1.2})})
        if step % 10 == 0:
            val_loss = 5 + 1 / (1 + step / 10)
            out.append({"step": step, "time": 1.7e9 + step, "val/loss": val_loss, "val/ppl": math.exp(val_loss),
                        **(extra_val or {})})
            out.append({"step": step, "time": 1.7e9 + step, "perf/checkpoint_s": 0.8})
    return out


def write_run(run_dir: Path, recs: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = imread(path).shape
    assert height > 300 and width > 600, (height, width)


def test_renders_every_panel_of_a_full_run(tmp_path):
    run = write_run(tmp_path / "demo", records())
    out = render(run)
    assert out == run / "report.png"
    assert_png(out)
    assert panels(records()) == ["loss", "learning rate", "throughput", "MFU", "memory", "gradient norm"]


def test_panels_of_absent_metrics_are_omitted():
    old_run = records(mfu=False, memory={})  # written before MFU and memory were logged
    assert panels(old_run) == ["loss", "learning rate", "throughput", "gradient norm"]
    train_only = [r for r in old_run if "train/loss" in r]
    assert panels([{"step": r["step"], "train/loss": r["train/loss"]} for r in train_only]) == ["loss"]
    assert panels(records(memory=GPU_MEMORY)) == panels(records())  # GPU memory keys fill the memory panel


def test_fine_tuning_metrics_get_their_panel(tmp_path):
    finetune = records(extra_val={"val/accuracy": 0.8, "val/macro_f1": 0.75})
    assert panels(finetune)[-1] == "fine-tuning"
    assert_png(render(write_run(tmp_path / "ft", finetune), tmp_path / "pictures" / "ft.png"))


def test_a_record_being_written_is_ignored(tmp_path):
    run = write_run(tmp_path / "live", records())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "train/lo')  # a live run halfway through writing its next line
    assert_png(render(run))


def test_non_finite_values_leave_gaps(tmp_path):
    recs = records()
    recs[2]["train/loss"], recs[3]["train/loss"], recs[4]["train/grad_norm"] = math.nan, math.inf, math.inf
    assert_png(render(write_run(tmp_path / "diverged", recs)))


@pytest.mark.parametrize("content,problem", [
    (None, "not found"),
    ("", "empty"),
    ('{"step": 1, "train/loss": 9.0}\nnot json\n', "line 2 is not JSON"),
    ('{"train/loss": 9.0}\n', "line 1 is not a metrics record"),
])
def test_a_missing_empty_or_corrupt_file_is_named(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError) as error:
        render(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'metrics.jsonl'}: ") and problem in str(error.value)
    assert not (tmp_path / "report.png").exists()


def test_cli_prints_the_path_written(tmp_path):
    run = write_run(tmp_path / "run", records())
    out = tmp_path / "report-copy.png"
    result = zerotrain("report", run, "--output", out)
    assert result.stdout.strip() == str(out)
    assert_png(out)


def test_several_runs_are_drawn_in_one_figure(tmp_path):
    """Each run in its colour, each panel's metrics in their line styles, the runs named in the legend; a run
    without MFU leaves that panel to the others; a missing run is named."""
    first = write_run(tmp_path / "a" / "run", records())
    second = write_run(tmp_path / "b" / "run", [{**r, "train/loss": r["train/loss"] + 1} if "train/loss" in r else r
                                                for r in records(mfu=False)])
    out = tmp_path / "both.png"
    result = zerotrain("report", first, second, "--output", out)
    assert result.stdout.strip() == str(out)
    assert_png(out)
    figure = Figure()
    axes = figure.add_subplot()
    _draw(axes, PANELS[0], ["train/loss", "val/loss"], {"a": read_metrics(first), "b": read_metrics(second)})
    lines = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in axes.get_lines()}
    assert lines == {"a: train/loss": ("C0", "-"), "a: val/loss": ("C0", "--"), "b: train/loss": ("C1", "-"),
                     "b: val/loss": ("C1", "--")}
    assert compare([first, second], tmp_path / "x.png") and _name(first, [first, second]) == str(first)
    missing = zerotrain("report", first, tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and "nothing/metrics.jsonl: not found" in missing.stderr


def test_cli_refuses_a_missing_run_dir_with_one_line():
    script = Path(sys.executable).with_name("zerotrain")  # the installed command, as a user runs it
    result = subprocess.run([script, "report", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "zerotrain: error: /nonexistent/metrics.jsonl: not found (not a zerotrain run " \
                            "directory, or no step logged yet)\n"


@pytest.mark.slow
def test_renders_a_real_run(tiny_run, tmp_path):
    out = render(tiny_run, tmp_path / "tiny.png")
    assert_png(out)
    assert panels(read_metrics(tiny_run)) == ["loss", "learning rate", "throughput", "MFU", "memory",
                                              "gradient norm"]
