"""Checkpoint save and load speed of zerotrain's checkpoints against the disk's own sequential write speed.

Starts `--nproc` ranks with torchrun on a ~50-100M-parameter Llama (configs/demo.yaml's architecture, widened
by --hidden/--layers), trains 2 steps, then times `trainer.checkpoint.save` (DeepSpeed's shards, fsync of
every file, SHA-256 manifest, atomic rename) and `trainer.checkpoint.load` for each --stages, and, in the same
run, a plain sequential write + fsync of as many bytes from one process (the disk's speed). Printed: seconds,
GB, GB/s and the ratio of each to the disk's write bandwidth.

    .venv/bin/python bench/checkpoint_io.py [--stages 2 3] [--hidden 768] [--layers 8] [--nproc 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rank_main(config_path: str, out: str) -> None:
    """One rank: build the engine as the trainer does, train 2 steps, time a save and a load."""
    import torch.distributed as dist

    from data_pipeline import Manifest, packed_sources
    from trainer import checkpoint, distributed, resume
    from trainer.config import load_config
    from trainer.data import open_data
    from trainer.engine import build_engine
    from trainer.model import lm_loss

    cfg = load_config(config_path)
    rank = distributed.init()
    engine, _ = build_engine(cfg, open_data(cfg), load_universal=False)
    data = packed_sources(Manifest.load(cfg.data.prepared_dir), "train", cfg.data.seq_len)
    import torch

    for _ in range(2):
        batch = torch.stack([data[i] for i in range(cfg.train.micro_batch_size)])
        engine.backward(lm_loss(engine, batch))
        engine.step()
    state = checkpoint.TrainState(step=2)
    dist.barrier()
    start = time.perf_counter()
    folder = checkpoint.save(engine, cfg.run_dir, state, None, keep_last=1, keep_every=0)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    resume.load_engine(engine, cfg.run_dir, resume.ResumePoint(folder.name, dist.get_world_size(), False, False))
    dist.barrier()
    load_s = time.perf_counter() - start
    if rank.is_main:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        Path(out).write_text(json.dumps({"save_s": save_s, "load_s": load_s, "bytes": size}))
    distributed.shutdown()


def disk_write_gbps(folder: Path, nbytes: int) -> float:
    block = os.urandom(16 * 2**20)
    path = folder / "disk-probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    written = path.stat().st_size
    path.unlink()
    return written / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    from trainer.config import load_config

    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").exists() else None) as tmp:
        for stage in args.stages:
            run_dir = Path(tmp) / f"stage{stage}"
            cfg = load_config(REPO / "configs" / "demo.yaml", [
                f"run.output_dir={run_dir}", f"zero.stage={stage}", f"launch.nproc_per_node={args.nproc}",
                f"model.config.hidden_size={args.hidden}", f"model.config.intermediate_size={args.hidden * 8 // 3}",
                f"model.config.num_hidden_layers={args.layers}", f"model.config.num_attention_heads={args.hidden // 64}",
                f"model.config.num_key_value_heads={args.hidden // 64}", "train.micro_batch_size=2",
                f"train.global_batch_size={2 * args.nproc}"])
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
            out = run_dir / "result.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // args.nproc)), "DS_ACCELERATOR": "cpu"}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={args.nproc}", __file__, "--rank-main", str(run_dir / "config.yaml"),
                            str(out)], cwd=REPO, check=True, capture_output=True, env=env)
            result = json.loads(out.read_text())
            disk = disk_write_gbps(run_dir, result["bytes"])
            gb = result["bytes"] / 1e9
            save_bw, load_bw = gb / result["save_s"], gb / result["load_s"]
            print(f"ZeRO {stage}, {args.nproc} ranks, {gb:.2f} GB: save {result['save_s']:.2f} s ({save_bw:.2f} GB/s, "
                  f"{save_bw / disk:.2f}x the disk), load {result['load_s']:.2f} s ({load_bw:.2f} GB/s); "
                  f"disk sequential write + fsync {disk:.2f} GB/s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], sys.argv[3])
        sys.stdout.flush()
        os._exit(0)
    main()
