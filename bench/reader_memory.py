"""Memory of a process reading, through zerotrain's loader, a corpus 10x larger than the memory it may use.

Builds a 5 GiB prepared dir (2.7G tokens) out of real tokens: the train split that `zerotrain prepare CONFIG`
makes (configs/demo.yaml unless told), repeated into 256 MiB shards and listed in a manifest.json that
otherwise copies the real one; the files are dropped from the page cache once written. A reader process, in
a new memory cgroup capped at 512 MiB (cgroup v2 memory.max, else v1 memory.limit_in_bytes; a child of this
process's cgroup, so root is needed), reads the samples in the sampler's shuffled order through the loader
the trainer builds (packed_sources + GlobalOrder + GlobalBatchSampler, a DataLoader with the config's
data.num_workers; micro-batches of 8 x 8192), all of them or until --max-seconds. RssAnon and RssFile of the
reader and its workers are sampled every second. Printed: the read rate, start (after the first batch) / peak /
end of each, and RssAnon peak / start (goal: about 1, flat). Everything it creates is removed at the end.
Where no cgroup can be made it says so and reads uncapped (RssFile then grows with the page cache).

    .venv/bin/python bench/reader_memory.py [--config configs/demo.yaml] [--corpus-gib 5] [--memory-mib 512]
                                            [--seq-len 8192] [--micro-batch 8] [--max-seconds 120]
"""
import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline import GlobalBatchSampler, GlobalOrder, Manifest, packed_sources
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
ZEROTRAIN = Path(sys.executable).with_name("zerotrain")
SHARD_TOKENS = 128 * 2**20  # data.shard_tokens' default: 256 MiB shards
MIB = 2**20


def write_corpus(real: Manifest, out: Path, gib: float) -> int:
    """`gib` GiB of shards repeating the real train tokens, and a manifest listing them. Returns the token count."""
    tokens = np.concatenate([real.store("train", s).read(0, real.num_tokens("train", s)) for s in real.sources])
    shard = np.resize(tokens, SHARD_TOKENS)
    record = {**real.data["sources"][0]["splits"]["train"]["shards"][0], "num_tokens": len(shard),
              "bytes": shard.nbytes, "sha256": hashlib.sha256(shard).hexdigest()}
    shards = []
    for i in range(max(1, round(gib * 2**30 / shard.nbytes))):
        shards.append({**record, "file": f"train_{i:05d}.bin"})
        with open(out / shards[-1]["file"], "wb") as f:
            shard.tofile(f)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the reader's cgroup pays for its reads
    split = {"num_tokens": len(shard) * len(shards), "num_docs": 0, "shards": shards}
    source = {"name": "repeated", "weight": None, "splits": {"train": split, "validation": split}}
    (out / "manifest.json").write_text(json.dumps({**real.data, "sources": [source]}))
    return split["num_tokens"]


def memory_cgroup(limit: int) -> tuple[Path, str, str] | None:
    """A new child of this process's cgroup capped at `limit` bytes, swap included (swapped-out pages would leave
    RssAnon): (folder, limit file, peak usage file)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            roots = [r for r in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified") if Path(r, "cgroup.controllers").exists()]
            files, swap = ("memory.max", "memory.peak"), ("memory.swap.max", 0)
        elif "memory" in controllers.split(","):
            roots, files = ["/sys/fs/cgroup/memory"], ("memory.limit_in_bytes", "memory.max_usage_in_bytes")
            swap = ("memory.memsw.limit_in_bytes", limit)
        else:
            continue
        for root in roots:
            group = Path(root) / path.lstrip("/") / f"zerotrain-bench-{os.getpid()}"
            try:
                group.mkdir()
                (group / files[0]).write_text(str(limit))  # fails where the memory controller is not enabled
                if (group / swap[0]).exists():  # absent without swap accounting
                    (group / swap[0]).write_text(str(swap[1]))
                return group, *files
            except OSError:
                if group.exists():
                    group.rmdir()
    return None


def rss_mib(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["RssAnon"].split()[0]) / 1024, int(status["RssFile"].split()[0]) / 1024


def read_everything(prepared: Path, seq_len: int, micro_batch: int, num_workers: int, seed: int,
                    max_seconds: float) -> dict:
    """The reader process: every sample once, in the sampler's order (or until max_seconds); RSS of itself and
    its workers about every second."""
    import psutil
    from torch.utils.data import DataLoader

    manifest = Manifest.load(prepared)
    train_set = packed_sources(manifest, "train", seq_len)
    order = GlobalOrder([len(d) for d in train_set.datasets], manifest.weights, seed)
    sampler = GlobalBatchSampler(order, micro_batch, micro_batch, rank=0, world_size=1)
    num_batches = len(train_set) // micro_batch
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers)
    samples, start, sampled = [], time.perf_counter(), 0.0
    for b, _ in enumerate(itertools.islice(loader, num_batches)):
        now = time.perf_counter() - start
        done = b == num_batches - 1 or now > max_seconds
        if b == 0 or done or now - sampled >= 1:
            samples.append([rss_mib(p.pid) for p in [psutil.Process(), *psutil.Process().children()]])
            sampled = now
        if done:
            break
    return {"batches": b + 1, "of": num_batches, "seconds": time.perf_counter() - start, "samples": samples}


def report(result: dict, token_bytes: int, seq_len: int, micro_batch: int) -> None:
    samples, seconds, batches = result["samples"], result["seconds"], result["batches"]
    read = batches * micro_batch * (seq_len + 1) * token_bytes
    print(f"read {batches:,} of the {result['of']:,} batches of {micro_batch} x {seq_len} "
          f"({batches / result['of']:.0%}), {read / 2**30:.2f} GiB in shuffled order, in {seconds:.0f}s: "
          f"{read / MIB / seconds:,.1f} MiB/s"
          + ("" if batches == result["of"] else " (stopped at --max-seconds)"))
    print(f"{'MiB':10}{'RssAnon start / peak / end':>30}{'RssFile start / peak / end':>30}")
    for p in range(len(samples[0])):
        anon, file = ([s[p][k] for s in samples] for k in (0, 1))
        print(f"{'reader' if p == 0 else f'worker {p}':10}"
              + "".join(f"{f'{x[0]:,.0f} / {max(x):,.0f} / {x[-1]:,.0f}':>30}" for x in (anon, file)))
        print(f"{'':10}RssAnon peak / start: {max(anon) / anon[0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--corpus-gib", type=float, default=5)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=120, help="stop reading after this long")
    parser.add_argument("--read", type=Path, help=argparse.SUPPRESS)  # the reader process
    args = parser.parse_args()
    cfg = load_config(args.config)
    if args.read:
        return print(json.dumps(read_everything(args.read, args.seq_len, args.micro_batch, cfg.data.num_workers,
                                                cfg.run.seed, args.max_seconds)))
    prepared = subprocess.run([ZEROTRAIN, "prepare", args.config], capture_output=True, text=True)
    if prepared.returncode:
        sys.exit(f"zerotrain prepare {args.config} failed: {prepared.stderr.strip()}")
    if shutil.disk_usage(REPO / "data").free < (args.corpus_gib + 2) * 2**30:
        sys.exit(f"not enough free disk in {REPO / 'data'} for a {args.corpus_gib} GiB corpus")
    cgroup = memory_cgroup(args.memory_mib * MIB)
    with tempfile.TemporaryDirectory(prefix="reader-memory-", dir=REPO / "data") as tmp:
        try:
            start, real = time.perf_counter(), Manifest.load(cfg.data.prepared_dir)
            num_tokens = write_corpus(real, Path(tmp), args.corpus_gib)
            token_bytes = np.dtype(real.data["dtype"]).itemsize
            print(f"corpus: {num_tokens * token_bytes / 2**30:.1f} GiB ({num_tokens:,} tokens: the train split of "
                  f"{cfg.data.prepared_dir} repeated), written in {time.perf_counter() - start:.0f}s", flush=True)
            if cgroup:
                print(f"reader capped at {args.memory_mib} MiB by {cgroup[0] / cgroup[1]}: "
                      f"the corpus is {num_tokens * token_bytes / (args.memory_mib * MIB):.1f}x its memory")
            else:
                print("no memory cgroup could be made (needs root and a memory controller): reading uncapped")
            join = (lambda: (cgroup[0] / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
            reader = subprocess.run([sys.executable, __file__, "--config", args.config, "--read", tmp,
                                     "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                                     "--max-seconds", str(args.max_seconds)],
                                    stdout=subprocess.PIPE, text=True, preexec_fn=join)
            if reader.returncode:
                sys.exit(f"the reader failed with exit code {reader.returncode}"
                         + (" (-9: killed, likely by the memory cap)" if reader.returncode == -9 else ""))
            report(json.loads(reader.stdout), token_bytes, args.seq_len, args.micro_batch)
            if cgroup and (cgroup[0] / cgroup[2]).exists():
                peak = int((cgroup[0] / cgroup[2]).read_text()) / MIB
                print(f"cgroup peak usage: {peak:,.0f} MiB of {args.memory_mib} MiB (page cache included)")
        finally:
            if cgroup:
                cgroup[0].rmdir()


if __name__ == "__main__":
    main()
