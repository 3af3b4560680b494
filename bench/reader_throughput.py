"""Tokens/s that zerotrain's training data loader delivers, against raw memory-mapped reads and against what
training consumes.

The data is what `zerotrain prepare CONFIG` prepares (run first: a no-op when it is up to date); CONFIG is
configs/demo.yaml unless told. Compared, alternately, `--repeats` times for `--seconds` each (best of each):
    loader    one rank's loader built as the trainer builds it: packed_sources + GlobalOrder + GlobalBatchSampler
              through a torch DataLoader with data.num_workers workers (batches stacked as numpy in the
              worker, tensors again in the rank), micro-batches of
              train.micro_batch_size x data.seq_len (demo: 8 x 128, 1 worker); the first batch is not timed
    tensors   the same loader with torch's default collate: tensor batches cross from the worker through shared
              memory (what the trainer did before)
    raw       np.memmap of the same train shard files: random windows of seq_len + 1 tokens, stacked
              micro_batch_size at a time, in this process (no loader at all)
Consumption is what one training rank takes: the run's measured tokens/s (RUN_DIR/summary.json, from
`make demo`) over its ranks, or --consumed. Goal: loader capacity >= 100 x consumption. Run it from the
repository root (relative paths in CONFIG are relative to the working directory).

    .venv/bin/python bench/reader_throughput.py [--config configs/demo.yaml] [--seconds 5] [--repeats 3]
                                                [--consumed TOKENS_PER_S_PER_RANK]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from torch.utils.data import DataLoader, default_convert

from data_pipeline import GlobalBatchSampler, GlobalOrder, Manifest, packed_sources, stack_numpy
from trainer.config import load_config

ZEROTRAIN = Path(sys.executable).with_name("zerotrain")


def loader_tokens_per_s(cfg, manifest: Manifest, seconds: float, numpy_batches: bool = True) -> float:
    """numpy_batches: as the trainer collates (stack_numpy); else torch's default collate, whose tensors cross
    from the worker through shared memory."""
    train_set = packed_sources(manifest, "train", cfg.data.seq_len)
    order = GlobalOrder([len(d) for d in train_set.datasets], manifest.weights, cfg.run.seed)
    sampler = GlobalBatchSampler(order, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                 rank=0, world_size=cfg.world_size)
    batches = map(default_convert, DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                              collate_fn=stack_numpy if numpy_batches else None))
    next(batches)  # worker start-up
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(batches)
        n += 1
    return n * cfg.train.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - start)


def raw_tokens_per_s(cfg, manifest: Manifest, seconds: float) -> float:
    stores = [manifest.store("train", source) for source in manifest.sources]
    maps = [np.memmap(s.dir / r["file"], s.dtype, mode="r") for s in stores for r in s.records]
    sizes = np.array([len(m) for m in maps])
    rng, window, batch = np.random.default_rng(0), cfg.data.seq_len + 1, cfg.train.micro_batch_size
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        shards = rng.choice(len(maps), batch, p=sizes / sizes.sum())
        offsets = rng.integers(0, sizes[shards] - window + 1)
        np.stack([maps[s][o : o + window] for s, o in zip(shards, offsets)])
        n += 1
    return n * batch * cfg.data.seq_len / (time.perf_counter() - start)


def consumed_tokens_per_s(run_dir: Path) -> tuple[float, str] | None:
    """One rank's share of the run's measured tokens/s, and where it comes from."""
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary.exists():
        return None
    total = json.loads(summary.read_text())["tokens_per_s"]
    ranks = yaml.safe_load(config.read_text())["launch"]["nproc_per_node"]
    return total / ranks, f"{summary}: {total:,.0f} tokens/s over {ranks} ranks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--consumed", type=float, help="tokens/s one training rank consumes (default: the run's)")
    args = parser.parse_args()
    prepared = subprocess.run([ZEROTRAIN, "prepare", args.config], capture_output=True, text=True)
    if prepared.returncode:
        sys.exit(f"zerotrain prepare {args.config} failed: {prepared.stderr.strip()}")
    cfg = load_config(args.config)
    manifest = Manifest.load(cfg.data.prepared_dir)
    loader, tensors, raw = [], [], []
    for i in range(args.repeats):
        loader.append(loader_tokens_per_s(cfg, manifest, args.seconds))
        tensors.append(loader_tokens_per_s(cfg, manifest, args.seconds, numpy_batches=False))
        raw.append(raw_tokens_per_s(cfg, manifest, args.seconds))
        print(f"repeat {i + 1}: loader {loader[-1]:,.0f} tokens/s, with tensor batches {tensors[-1]:,.0f}, raw "
              f"memmap windows {raw[-1]:,.0f}", flush=True)
    print(f"loader ({cfg.data.num_workers} worker(s), {cfg.train.micro_batch_size} x {cfg.data.seq_len}, "
          f"{manifest.num_tokens('train'):,} train tokens): {max(loader):,.0f} tokens/s; "
          f"raw memmap windows: {max(raw):,.0f} tokens/s; loader / raw: {max(loader) / max(raw):.2f}; numpy / tensor "
          f"batches: {max(loader) / max(tensors):.2f} ({cfg.train.micro_batch_size * cfg.data.seq_len / max(loader) * 1e3:.2f} "
          f"vs {cfg.train.micro_batch_size * cfg.data.seq_len / max(tensors) * 1e3:.2f} ms per batch)")
    consumed = (args.consumed, "--consumed") if args.consumed else consumed_tokens_per_s(cfg.run_dir)
    if consumed is None:
        print(f"no {cfg.run_dir / 'summary.json'} (`make demo` writes it): pass --consumed for the capacity ratio")
        return
    print(f"training consumes {consumed[0]:,.0f} tokens/s per rank ({consumed[1]}); "
          f"loader capacity / consumption: {max(loader) / consumed[0]:,.0f}x (goal >= 100x)")


if __name__ == "__main__":
    main()
