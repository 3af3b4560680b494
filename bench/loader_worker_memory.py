"""Host memory of a rank's DataLoader workers: forked after the model exists (zerotrain before), forked before
it (zerotrain now), or started by a forkserver.

One process stands in for a rank: it imports what a rank imports, opens the prepared shards, builds a
DataLoader with --workers workers, and allocates and then rewrites --state-gib of "model states" (as the
optimizer rewrites its states every step) - before or after the workers start, by variant. Printed per
variant: the largest worker's resident anonymous memory (RssAnon: what the kernel charges it, shared pages
included) against the rank's, and the time to the first batch.

    .venv/bin/python bench/loader_worker_memory.py [--state-gib 2] [--workers 2]
"""

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline import GlobalBatchSampler, GlobalOrder, Manifest, packed_sources  # noqa: E402
from trainer.config import load_config  # noqa: E402
import deepspeed  # noqa: E402,F401 - a rank imports it: its pages are part of what a worker may share
import transformers  # noqa: E402,F401


def measure(variant: str, state_gib: float, workers: int) -> dict:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    dataset = packed_sources(Manifest.load(cfg.data.prepared_dir), "train", cfg.data.seq_len)
    sampler = GlobalBatchSampler(GlobalOrder([len(dataset)], [1.0], 0), 16, 8, 0, 2)
    context = multiprocessing.get_context("forkserver") if variant == "forkserver" else None
    states = torch.empty(0)
    if variant == "fork after the model":
        states = torch.ones(int(state_gib * 2**30 / 4))
    started = time.perf_counter()
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers, multiprocessing_context=context))
    next(batches)
    startup = time.perf_counter() - started
    if variant != "fork after the model":
        states = torch.ones(int(state_gib * 2**30 / 4))
    for _ in range(3):  # the optimizer rewrites its states every step: copy-on-write copies for forked workers
        states.mul_(1.0001)
        next(batches)
    me = psutil.Process()
    children = [p for p in me.children(recursive=True) if p.cmdline() and "forkserver" not in " ".join(p.cmdline())]
    result = {"variant": variant, "rank_anon": _anon(me), "worker_anon": max(_anon(p) for p in children[-workers:]),
              "startup_s": startup}
    del batches
    return result


def _anon(process: psutil.Process) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-gib", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    gib = 2**30
    print(f"{'variant':<22}{'rank RssAnon':>14}{'worker RssAnon':>16}{'ratio':>8}{'first batch s':>15}")
    for variant in ("fork after the model", "fork before the model", "forkserver"):
        r = measure(variant, args.state_gib, args.workers)
        print(f"{variant:<22}{r['rank_anon'] / gib:>13.2f}G{r['worker_anon'] / gib:>15.2f}G"
              f"{r['worker_anon'] / r['rank_anon']:>8.2f}{r['startup_s']:>15.2f}")


if __name__ == "__main__":
    main()
