"""The baseline of bench/loop_overhead.py: the shortest honest DeepSpeed training loop.

Same model, DeepSpeed config, batch shapes and token shards as a zerotrain run of the given config, but
none of zerotrain's loop: contiguous windows read straight from the memory-mapped shard, no sampler, no
DataLoader, no metrics. Start with torchrun; rank 0 prints one JSON line with its throughput.
"""

import json
import sys
import time

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline import Manifest
from trainer.config import load_config
from trainer.engine.deepspeed_config import deepspeed_config
from transformers import AutoModelForCausalLM

from trainer.model.build import build_model, model_config


def main(config_path: str, steps: int, warmup: int) -> None:
    cfg = load_config(config_path)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    manifest = Manifest.load(cfg.data.prepared_dir)
    shard = manifest.data["splits"]["train"]["shards"][0]
    tokens = np.memmap(manifest.dir / shard["file"], dtype=manifest.data["dtype"], mode="r")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, model_config(cfg.model, manifest.vocab_size), AutoModelForCausalLM)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(cfg, sum(p.numel() for p in model.parameters())))
    mb, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    rng = np.random.default_rng(dist.get_rank())
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            starts = rng.integers(0, len(tokens) - seq - 1, mb)
            batch = torch.from_numpy(np.stack([tokens[s:s + seq + 1] for s in starts]).astype(np.int64))
            batch = batch.to(engine.device)
            logits = engine(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
    loss.item()  # wait for the device
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        tokens_per_s = (steps - warmup) * cfg.train.global_batch_size * seq / seconds
        print(json.dumps({"tokens_per_s": tokens_per_s}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
