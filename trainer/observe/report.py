"""A run's curves in one picture: RUN_DIR/metrics.jsonl drawn to RUN_DIR/report.png.

Drawn on a bare `Figure` with the Agg canvas, not through pyplot: no display is needed (clusters, CI)
and nothing global (the backend, the list of open figures) changes in a process that calls `render`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer.config import ConfigError
from trainer.observe.metrics import read_records

DPI = 100  # about 1300 x 700 pixels for six panels: readable, and a small file


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # metrics drawn together, as fnmatch patterns (per-source and memory keys vary)
    ylabel: str
    scale: float = 1.0
    from_zero: bool = False  # amounts, not changes: a 0.1% wobble in memory should not fill the panel


PANELS = (
    Panel("loss", ("train/loss", "val/loss", "val/*/loss"), "loss"),
    Panel("learning rate", ("train/lr",), "lr"),
    Panel("throughput", ("perf/tokens_per_s",), "tokens/s", from_zero=True),
    Panel("MFU", ("perf/mfu",), "% of peak", scale=100, from_zero=True),  # logged as a fraction
    Panel("memory", ("mem/*_gib",), "GiB", from_zero=True),  # GPU: allocated/reserved/peak; CPU: rss
    Panel("gradient norm", ("train/grad_norm",), "norm before clipping"),
    Panel("fine-tuning", ("val/accuracy", "val/macro_f1"), "score"),
    Panel("router loss", ("train/router_aux_loss",), "load-balancing loss"),
    # 1: every expert of the layer got as many tokens; experts / top-k: one expert got them all
    Panel("expert load", ("moe/layer*/load_max_mean",), "busiest expert / mean", from_zero=True),
)


def render(run_dir: Path, output: Path | None = None) -> Path:
    """Draw the run's metrics to `output` (default RUN_DIR/report.png) and return its path."""
    records = _read(run_dir)
    return _figure({run_dir.resolve().name: records}, _headline(run_dir.resolve().name, records),
                   output or run_dir / "report.png")


def compare(run_dirs: list[Path], output: Path) -> Path:
    """Draw several runs' metrics in one figure, each run in a colour of its own, to `output`; return its path."""
    runs = {_name(run_dir, run_dirs): _read(run_dir) for run_dir in run_dirs}
    return _figure(runs, "   vs   ".join(runs), output)


def panels(records: list[dict]) -> list[str]:
    """Titles of the panels `render` draws for these records: those with at least one metric present."""
    return [panel.title for panel, _ in _chosen(records)]


def _read(run_dir: Path) -> list[dict]:
    records = read_records(run_dir / "metrics.jsonl")
    if not records:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: empty (no step logged yet)")
    if not _chosen(records):
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: no metric that a report plots (no train/loss yet?)")
    return records


def _name(run_dir: Path, run_dirs: list[Path]) -> str:
    """A run's folder name, or its path where two runs share the name."""
    name = run_dir.resolve().name
    return name if [d.resolve().name for d in run_dirs].count(name) == 1 else str(run_dir)


def _figure(runs: dict[str, list[dict]], title: str, output: Path) -> Path:
    chosen = _chosen([record for records in runs.values() for record in records])
    columns = 3 if len(chosen) > 4 else 2
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.2 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for index, (panel, keys) in enumerate(chosen):
        _draw(figure.add_subplot(rows, columns, index + 1), panel, keys, runs)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=DPI)
    return output


def _chosen(records: list[dict]) -> list[tuple[Panel, list[str]]]:
    present = {key for record in records for key in record}
    chosen = [(panel, [key for pattern in panel.keys for key in sorted(fnmatch.filter(present, pattern))])
              for panel in PANELS]
    return [(panel, keys) for panel, keys in chosen if keys]


LINES = ("-", "--", ":", "-.")  # a panel's metrics, told apart by line style when runs take the colours


def _draw(axes, panel: Panel, keys: list[str], runs: dict[str, list[dict]]) -> None:
    several = len(runs) > 1
    for colour, (name, records) in enumerate(runs.items()):
        for index, key in enumerate(keys):
            points = [(r["step"], r[key] * panel.scale) for r in records if key in r]
            if not points:
                continue
            steps, values = zip(*points)
            # Validation comes every eval_every steps: markers show where the few points are.
            style = {"color": f"C{colour}", "linestyle": LINES[index % len(LINES)]} if several else {}
            axes.plot(steps, values, marker="o" if key.startswith("val/") else None, markersize=3,
                      label=f"{name}: {key}" if several else key, **style)
    axes.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
    top = axes.dataLim.ymax  # of the finite values; -inf when there are none
    if panel.from_zero and math.isfinite(top) and top > 0:  # a fixed floor leaves autoscaling no headroom
        axes.set_ylim(0, 1.1 * top)
    axes.grid(alpha=0.3)
    if len(keys) > 1 or several:
        axes.legend(fontsize="small")


def _headline(name: str, records: list[dict]) -> str:
    parts = [f"{name}: step {max(r['step'] for r in records)}"]
    train = _last(records, "train/loss")
    if train:
        parts.append(f"loss {train['train/loss']:.3f}")
    val = _last(records, "val/loss")
    if val:
        ppl = f" (ppl {val['val/ppl']:.1f})" if "val/ppl" in val else ""
        parts.append(f"val loss {val['val/loss']:.3f}{ppl}")
    for key, label in (("val/accuracy", "accuracy"), ("val/macro_f1", "macro-F1")):
        last = _last(records, key)
        if last:
            parts.append(f"{label} {last[key]:.3f}")
    return "   ".join(parts)


def _last(records: list[dict], key: str) -> dict | None:
    return next((r for r in reversed(records) if key in r), None)
