"""How well a run uses its hardware: model FLOPs per token, the device's peak, MFU and memory."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

import psutil
import torch

if TYPE_CHECKING:
    from trainer.model.shape import Architecture

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense bf16 peak per GPU (TFLOP/s, without sparsity), from the vendors' data sheets; the first name that
# appears in torch.cuda.get_device_name() wins, so more specific names come first.
GPU_PEAK_TFLOPS = {
    "GB200": 2500, "B200": 2250, "H200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989, "A100": 312,
    "A800": 312, "L40S": 362, "L40": 181, "A10G": 125, "A10": 125, "L4": 121, "V100": 125, "MI300X": 1307,
    "MI250X": 383, "T4": 65,
}


def flops_per_token(arch: Architecture, seq_len: int) -> int:
    """Training FLOPs per token: 6 per weight that multiplies it (forward 2, backward 4: 2 for the gradient of its
    input, 2 for its own; the input embedding is a lookup, not a matmul; of a mixture of experts' routed experts,
    the top-k the token goes to) plus attention's scores and weighted values, 12 * layers * hidden * seq_len (the
    PaLM paper's appendix B accounting; like it, the whole s x s score matrix counts). A frozen weight (a LoRA
    run's base) has no gradient of its own: 4."""
    return 6 * arch.multiplying - 2 * frozen_multiplying(arch) + 12 * arch.layers * arch.hidden * seq_len


def frozen_multiplying(arch: Architecture) -> int:
    """Frozen weights that multiply a token: a LoRA run's base less its input embedding (a lookup) and the experts
    the token does not use."""
    return max(0, arch.multiplying - arch.trainable)


def peak_flops(device: torch.device, dtype: torch.dtype, given_tflops: float | None) -> tuple[float, str]:
    """FLOP/s one rank can reach at best, and where the number comes from."""
    if given_tflops is not None:
        return given_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0), f"{name}: data sheet"
        return _matmul_probe(device, dtype), f"{name}: not in the table, measured by a matmul probe"
    return _matmul_probe(device, dtype), "CPU: measured by a matmul probe at start-up"


def _matmul_probe(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """The best matmul rate this rank gets with its threads (every rank probes at once, as they will train)."""
    rng = torch.Generator(device).manual_seed(0)  # its own: a resumed run's restored RNG states stay untouched
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=rng) for _ in range(2))
    a @ b  # warm-up: kernels chosen, threads woken
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def memory_gib(device: torch.device) -> dict[str, float]:
    """This rank's memory: the allocator's view on a GPU, the process's resident set on CPU."""
    gib = 2**30
    if device.type == "cuda":
        return {"mem/allocated_gib": torch.cuda.memory_allocated(device) / gib,
                "mem/reserved_gib": torch.cuda.memory_reserved(device) / gib,
                "mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib}
    # the peak: what the kernel's OOM killer weighs, and what a save's transient copies reach
    rss = psutil.Process().memory_info().rss
    peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss: KiB, sampled
    return {"mem/rss_gib": rss / gib, "mem/peak_rss_gib": peak / gib}


class Throughput:
    """Rates of a window of steps, for the whole job and per rank, and MFU against one rank's peak."""

    def __init__(self, samples_per_step: int, seq_len: int, world_size: int, flops_per_token: float, peak: float):
        self.samples_per_step, self.seq_len, self.world_size = samples_per_step, seq_len, world_size
        self.flops_per_token, self.peak = flops_per_token, peak

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        samples_per_s = steps * self.samples_per_step / seconds
        tokens_per_s = samples_per_s * self.seq_len
        rank_flops = tokens_per_s * self.flops_per_token / self.world_size
        return {"perf/tokens_per_s": tokens_per_s, "perf/tokens_per_s_per_rank": tokens_per_s / self.world_size,
                "perf/samples_per_s": samples_per_s, "perf/step_s": seconds / steps,
                "perf/model_tflops_per_rank": rank_flops / 1e12, "perf/mfu": rank_flops / self.peak}
