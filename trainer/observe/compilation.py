"""What train.compile cost and where it broke the graph, read from dynamo's own counters: for the log, the
metrics, and the throughput (compiling is not training time)."""

from __future__ import annotations

import re
import sys

# dynamo's compile timers: a frame's forward (traced and compiled when first run), and its backward graph
# (compiled when backward first runs through it)
TIMERS = ("_compile.compile_inner", "backward._backward_impl")
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def seconds() -> float:
    """Seconds spent compiling in this process so far (0 without compiling)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled; importing dynamo would cost a second
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(timer, ())) for timer in TIMERS)


def graph_breaks() -> dict[str, int]:
    """Why dynamo broke the graph (its explanation), and how often."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        lines = [line.strip() for line in reason.strip().splitlines()]
        said = next((line.removeprefix("Explanation: ") for line in lines if line.startswith("Explanation:")), lines[0])
        said = ADDRESS.sub("", said)  # the same hook of every module: one reason
        reasons[said] = reasons.get(said, 0) + count
    return reasons


def metrics() -> dict[str, float]:
    from torch._dynamo.utils import counters

    return {"compile/seconds": seconds(), "compile/graphs": counters["stats"]["unique_graphs"],
            "compile/graph_breaks": sum(graph_breaks().values())}


def describe() -> str:
    m, reasons = metrics(), graph_breaks()
    text = f"compiled in {m['compile/seconds']:.1f} s (not counted as training time): {m['compile/graphs']} " \
           f"graphs, {m['compile/graph_breaks']} graph breaks"
    return text + "".join(f"\n  graph break x{count}: {reason}" for reason, count in reasons.items())
