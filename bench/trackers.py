"""What the remote trackers cost training: tokens/s of the real CLI training the demo model (2 ranks, bf16,
ZeRO 2) with `metrics.trackers: [tensorboard, mlflow, wandb]` against `[tensorboard]`, logging every step (the
most a run sends). MLflow is a real tracking server on loopback (tests/mlflow_server.py: sqlite backend, from
.venv-mlflow-server, which `make test` installs); W&B runs offline. Runs alternate, medians of the logged
perf/tokens_per_s after start-up.

    .venv/bin/python bench/trackers.py [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from demo_runs import REPO, prepare, train

sys.path.insert(0, str(REPO / "tests"))
from mlflow_server import mlflow_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    prepare()
    alone, tracked = [], []
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(Path(tmp) / "mlflow") as (uri, _):
        for _ in range(args.repeats):
            alone.append(train([f"train.max_steps={args.steps}"]).median("perf/tokens_per_s", after=2))
            tracked.append(train([f"train.max_steps={args.steps}", "metrics.trackers=[tensorboard,mlflow,wandb]",
                                  f"metrics.mlflow.tracking_uri={uri}", "metrics.wandb.mode=offline"])
                           .median("perf/tokens_per_s", after=2))
    base, with_trackers = statistics.median(alone), statistics.median(tracked)
    print(f"tokens/s, TensorBoard only:            {base:,.0f}  (runs: {', '.join(f'{v:,.0f}' for v in alone)})")
    print(f"tokens/s, + MLflow + W&B, every step:  {with_trackers:,.0f}  "
          f"(runs: {', '.join(f'{v:,.0f}' for v in tracked)})")
    print(f"ratio: {with_trackers / base:.3f}")


if __name__ == "__main__":
    main()
