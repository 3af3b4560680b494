"""`zerotrain plan`: what a run needs of each GPU, worked out before a cluster is spent on it.

The model is built on the meta device (accelerate's `init_empty_weights`: exact parameter counts, no memory).
From it, the run config and the cluster shape (nodes x GPUs per node = the data-parallel world size N) come:

- FLOPs per token: 6N' + 12·L·h·s (PaLM appendix B, Megatron-LM), N' = the parameters that multiply (all but
  the input embedding, a lookup); like those papers the attention term counts the whole s x s score matrix.
- Memory per GPU for every ZeRO stage and offload: trainer/memory.py's model (model states by the ZeRO paper's
  accounting, DeepSpeed's buffers read from the config zerotrain writes, activations per micro-batch; its
  docstring gives the formulas), against the GPU's memory less MARGIN.

The numbers of DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`, what the `..._all_cold`
functions print) are shown beside ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.config import Config, ConfigError
from trainer.engine import DEEPSPEED
from trainer.engine.autoep import check_expert_split
from trainer.engine.limits import accumulation_dtype
from trainer.parallel.layout import ParallelLayout
from trainer.tasks import task_of
from trainer.memory import OPTIONS, Estimate, GiB, Option, architecture, element_bytes, estimate, recommend
from trainer.model.shape import Architecture, check_sequence_split, check_tensor_split
from trainer.observe.perf import flops_per_token, frozen_multiplying

MARGIN = 0.10  # of GPU memory left free for the CUDA context, NCCL's buffers and allocator fragmentation


# ---------------------------------------------------------------------------------------------------------------
# the command line's --gpu-memory

def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '141G', '80' -> GiB. GPU makers' "80GB" is 80 GiB (nvidia-smi shows 81920 MiB), so G, GB
    and GiB all mean GiB; M/MB/MiB and T/TB/TiB scale by 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([mgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match or (not match[2] and re.search(r"[a-z]", str(text), re.IGNORECASE)):
        raise ConfigError(f"--gpu-memory: expected a size such as 80GB, 80GiB or 141G (got {text!r})")
    gib = float(match[1]) * {"m": 1 / 1024, "": 1, "g": 1, "t": 1024}[match[2].lower()]
    if gib <= 0:
        raise ConfigError(f"--gpu-memory: must be more than 0 (got {text!r})")
    return gib


def deepspeed_estimate(arch: Architecture, option: Option, nodes: int, gpus_per_node: int) -> tuple[int, int] | None:
    """(GPU bytes, of which the largest layer) per DeepSpeed's estimators, for stages 2 and 3; they assume
    16-bit training. Stage 3's figure includes 4 B x the largest layer (its gathered weights and gradients)."""
    if option.stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(arch.params, gpus_per_node, nodes,
                                                       cpu_offload=option.offload_optimizer)
        return gpu, 0
    if option.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        # zero_init: zerotrain builds stage-3 models inside deepspeed.zero.Init (zero.partitioned_init, the default);
        # it changes only DeepSpeed's CPU figure, which the plan does not show
        _, gpu, largest = estimate_zero3_model_states_mem_needs(
            arch.params, arch.largest_layer, gpus_per_node, nodes, cpu_offload=option.offload_optimizer,
            cpu_offload_params=option.offload_param, zero_init=True)
        return gpu, largest
    return None


# ---------------------------------------------------------------------------------------------------------------
# the report


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_memory_gib: float, vocab_size: int | None = None) -> str:
    """A printable report: model, compute, per-GPU memory of every ZeRO stage and offload choice, a recommendation,
    and DeepSpeed's own estimates beside ours."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--gpu-memory", gpu_memory_gib)):
        if not value > 0:
            raise ConfigError(f"{flag}: must be more than 0 (got {value})")
    for name, degree in (("sequence", cfg.parallel.sequence), ("tensor", cfg.parallel.tensor),
                         ("expert", cfg.parallel.expert)):
        if (nodes * gpus_per_node) % degree:
            raise ConfigError(f"parallel.{name}: {degree} does not divide the {nodes * gpus_per_node} GPUs of "
                              "--nodes x --gpus-per-node")
    arch = architecture(cfg, vocab_size)
    estimates = _estimates(cfg, arch, nodes, gpus_per_node)
    usable = gpu_memory_gib * (1 - MARGIN) * GiB
    # small models read better in MiB
    mem = Units("GiB", GiB) if max(est.peak() for est in estimates) >= GiB else Units("MiB", 2**20)
    lines = (_header(cfg, arch, estimates[0], nodes, gpus_per_node, gpu_memory_gib, mem)
             + _table(estimates, usable, gpus_per_node, mem)
             + _verdict(cfg, arch, estimates, usable, nodes, gpus_per_node, mem)
             + _cross_check(arch, estimates, nodes, gpus_per_node, cfg.train.precision, mem, cfg.parallel.expert))
    return "\n".join(lines) + "\n"


def _estimates(cfg: Config, arch: Architecture, nodes: int, gpus_per_node: int) -> list[Estimate]:
    """Every ZeRO stage and offload choice zerotrain can run with the config's parallel degrees."""
    quantized = cfg.model.lora is not None and cfg.model.lora.quantize is not None
    return [estimate(cfg, arch, option, nodes, gpus_per_node) for option in OPTIONS
            if (cfg.parallel.tensor == 1 and not quantized) or option.stage < 3]  # AutoTP, QLoRA: ZeRO 0-2


@dataclass(frozen=True)
class Units:
    name: str
    size: int

    def __call__(self, n: float) -> str:
        return f"{n / self.size:.1f}"


def _count(n: float, units=((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))) -> str:
    return next((f"{n / d:.2f}{s}" for d, s in units if n >= d), f"{n:,.0f}")


def _flops(n: float) -> str:
    return _count(n, ((1e18, " EFLOP"), (1e15, " PFLOP"), (1e12, " TFLOP"), (1e9, " GFLOP"), (1e6, " MFLOP"))) \
        if n >= 1e6 else f"{n:,.0f} FLOP"


def _accumulation(cfg: Config, world: int) -> str:
    t, layout = cfg.train, ParallelLayout(world, cfg.parallel.sequence, cfg.parallel.tensor)
    per_step = t.micro_batch_size * layout.data_world
    if t.global_batch_size % per_step:
        return f"NOT a multiple of micro-batch x data-parallel ranks = {per_step}: zerotrain refuses this run"
    return f"gradient accumulation {layout.grad_accum(t.global_batch_size, t.micro_batch_size)}"


def _accumulation_dtypes(cfg: Config) -> str:
    by_stage = {stage: accumulation_dtype(cfg.train, stage) for stage in range(4)}
    if len(set(by_stage.values())) == 1:
        return by_stage[0]
    return f"{by_stage[1]} at ZeRO 1-3, {by_stage[0]} at ZeRO 0 (DeepSpeed {DEEPSPEED} sums in fp32 only under ZeRO)"


def _header(cfg: Config, arch: Architecture, est: Estimate, nodes: int, gpus_per_node: int,
            gpu_memory_gib: float, mem: Units) -> list[str]:
    t, s, world, e = cfg.train, cfg.data.seq_len, nodes * gpus_per_node, element_bytes(cfg.train.precision)
    per_token = flops_per_token(arch, s)
    embeddings = (f"embeddings {_count(arch.embedding)} in + {_count(arch.lm_head)} out" if arch.lm_head
                  else f"embeddings {_count(arch.embedding)} (tied)")
    sequence, tensor = cfg.parallel.sequence, cfg.parallel.tensor
    lora = [f"             LoRA rank {cfg.model.lora.rank}: {arch.trainable:,} parameters trained "
            f"({arch.trainable / arch.params:.2%}), the rest frozen: weights only, no gradients or optimizer "
            "states"] if cfg.model.lora else []
    frozen = f" - 2 x {_count(frozen_multiplying(arch))} frozen" if cfg.model.lora else ""
    split = f", {s // sequence} per rank of a sequence group of {sequence}" if sequence > 1 else ""
    held = [f"             a rank of a tensor group of {tensor} holds {_count(arch.held(tensor))} of them (the "
            "linear layers split, embedding and norms whole); ZeRO 0-2"] if tensor > 1 else []
    held += _experts(cfg, arch, world)
    states = ("4 B gradients + 8 B Adam moments (+ a 4 B fp32 master partition at stages 1-3)" if e == 4
              else "2 B gradients + 12 B optimizer states (4 B fp32 master + 8 B Adam moments)")
    return [
        f"zerotrain plan: {cfg.run.name} on {nodes} node(s) x {gpus_per_node} GPU(s) = {world} ranks, "
        f"{gpu_memory_gib:g} GiB per GPU",
        f"model        {cfg.model.type}, {arch.params:,} parameters ({_count(arch.params)}), {embeddings}",
        *lora,
        f"             {arch.layers} layers, hidden {arch.hidden}, {arch.heads} heads (KV dim {arch.kv_dim}), "
        f"MLP {arch.intermediate}{' gated' if arch.gated_mlp else ''}, vocab {arch.vocab}, attention {arch.attention}",
        *held,
        f"batch        {t.global_batch_size} x {s} = {_count(t.global_batch_size * s)} tokens per step; "
        f"micro-batch {t.micro_batch_size} per rank, {_accumulation(cfg, world)}",
        f"compute      6 x {_count(arch.multiplying)}{frozen} + 12 x {arch.layers} x {arch.hidden} x {s} = "
        f"{_flops(per_token)} per token ({12 * arch.layers * arch.hidden * s / per_token:.0%} attention), "
        f"{_flops(per_token * t.global_batch_size * s)} per step",
        f"precision    {t.precision}: per parameter {e} B weights + {states}",
        f"             gradients summed over micro-batches in {_accumulation_dtypes(cfg)} (train.grad_accum_dtype)",
        f"activations  {mem(est.activations)} {mem.name} per micro-batch ({t.micro_batch_size} x {s} tokens{split}); "
        f"{mem(est.activations_checkpointed)} {mem.name} with full activation checkpointing",
        "             (model.gradient_checkpointing: true)",
        "",
    ]


def _experts(cfg: Config, arch: Architecture, world: int) -> list[str]:
    """A mixture of experts: its routed experts, what a token uses of them, and what expert parallelism holds."""
    if not arch.expert_weights:
        return []
    moe, expert = arch.routing, cfg.parallel.expert
    active = arch.params - arch.idle_experts
    lines = [f"experts      {moe.experts} per MoE layer, {moe.top_k} per token: {_count(arch.expert_weights)} "
             f"parameters in routed experts; {_count(active)} of {_count(arch.params)} active per token"]
    if expert > 1:
        lines.append(f"             parallel.expert {expert}: a GPU holds {moe.experts // expert} of each layer's "
                     f"experts, ZeRO partitions them over the {world // expert} GPU(s) holding the same ones")
    return lines


def _table(estimates: list[Estimate], usable: float, gpus_per_node: int, mem: Units) -> list[str]:
    head = (f"{mem.name + ' per GPU':<34}{'params':>7}{'grads':>7}{'optim':>7}{'buffers':>8}{'activ':>7}{'peak':>7}"
            f"  fits | {'with ckpt':>9}  fits | offloaded to host")
    lines = [head, "-" * len(head)]
    for est in estimates:
        fits, fits_ckpt = est.peak() <= usable, est.peak(True) <= usable
        host = f"{mem(est.host * gpus_per_node)} {mem.name} per node" if est.host else ""
        lines.append(f"{str(est.option):<34}{mem(est.params):>7}{mem(est.grads):>7}{mem(est.optimizer):>7}"
                     f"{mem(est.resident + est.transient):>8}{mem(est.activations):>7}{mem(est.peak()):>7}  "
                     f"{'yes' if fits else 'no':<4} | {mem(est.peak(True)):>9}  {'yes' if fits_ckpt else 'no':<4} | "
                     f"{host}")
    return lines + [
        "peak = params + grads + optim + buffers + activations, or at the optimizer step (activations freed) with the",
        "fp32 gradients DeepSpeed makes instead of activations and backward buffers, if more",
        f"fits: peak <= {usable / GiB:.1f} GiB, the GPU's memory less {MARGIN:.0%} (CUDA context, NCCL, fragmentation)",
        "",
    ]


def _verdict(cfg: Config, arch: Architecture, estimates: list[Estimate], usable: float, nodes: int,
             gpus_per_node: int, mem: Units) -> list[str]:
    chosen = recommend(estimates, usable)
    configured = Option(cfg.zero.stage, cfg.zero.offload_optimizer != "none", cfg.zero.offload_param != "none")
    if chosen is None:
        lines = ["recommended: none fits, not even with activation checkpointing: use fewer tokens per micro-batch "
                 "(train.micro_batch_size, data.seq_len) or more GPUs"]
    else:
        est, checkpointing = chosen
        zero = est.option.zero_section()
        lines = [f"recommended: {est.option} (zero.stage: {zero.stage}, offload_optimizer: {zero.offload_optimizer}, "
                 f"offload_param: {zero.offload_param}), peak {mem(est.peak(checkpointing))} {mem.name} of "
                 f"{usable / GiB:.1f} GiB"]
        if checkpointing:
            lines.append("             only with activation checkpointing (model.gradient_checkpointing: true; "
                         "without it no stage fits)")
    if estimates[0].activations > usable:
        lines.append(f"             one micro-batch's activations alone ({mem(estimates[0].activations)} {mem.name}) "
                     "exceed the GPU, and more GPUs cannot help:")
        lines.append("             ZeRO partitions model states, not activations")
    same = chosen is not None and chosen[0].option == configured
    lines += _parallel_hint(cfg, arch, chosen, usable, nodes, gpus_per_node, mem)
    lines.append(f"configured:  {configured}" + ("" if same or chosen is None else " (not the recommendation)"))
    lines += _start_up(cfg, arch, usable, gpus_per_node, mem)
    saving = next(est for est in estimates if est.option == configured).save_copy if configured in OPTIONS else 0
    if cfg.async_saves and saving:
        lines.append(f"saving:      an asynchronous save (checkpoint.async) holds a host copy of each rank's share "
                     f"while it is written: up to {mem(saving)} {mem.name} per rank, {mem(saving * gpus_per_node)} "
                     f"{mem.name} per node")
    return lines + [""]


def _parallel_hint(cfg: Config, arch: Architecture, chosen: tuple[Estimate, bool] | None, usable: float,
                   nodes: int, gpus_per_node: int, mem: Units) -> list[str]:
    """When the run needs offload or activation checkpointing, or nothing fits, and it splits neither sequences
    nor weights yet: the smallest tensor or sequence degree within a node with which a stage fits without them."""
    if cfg.layout.model_parallel > 1 or cfg.parallel.expert > 1 or _plain(chosen):
        return []
    config = task_of(cfg).model_config(cfg.model, arch.vocab)
    for degree in (d for d in (2, 4, 8) if d <= gpus_per_node and gpus_per_node % d == 0):
        for name, check in (("expert", check_expert_split), ("tensor", check_tensor_split),
                            ("sequence", check_sequence_split)):
            run = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={name: degree})})
            try:
                check(config, degree)
            except ConfigError:
                continue
            if name == "sequence" and cfg.data.seq_len % degree:
                continue
            there = recommend(_estimates(run, arch, nodes, gpus_per_node), usable)
            if _plain(there):
                est = there[0]
                return [f"             or parallel.{name}: {degree} (within a node): {est.option} fits without "
                        f"offload or checkpointing, peak {mem(est.peak())} {mem.name}"]
    return []


def _plain(chosen: tuple[Estimate, bool] | None) -> bool:
    """Whether a recommendation needs neither optimizer offload nor activation checkpointing."""
    return chosen is not None and not chosen[1] and not chosen[0].option.offload_optimizer


def _start_up(cfg: Config, arch: Architecture, usable: float, gpus_per_node: int, mem: Units) -> list[str]:
    """How the configured run builds its model: partitioned at stage 3 (deepspeed.zero.Init), else whole."""
    if cfg.zero.stage == 3 and cfg.zero.partitioned_init:
        return ["start-up:    at stage 3 each rank builds only its partition of the model (deepspeed.zero.Init, "
                "zero.partitioned_init)"]
    # built whole in fp32 on the host, then deepspeed.initialize moves all of it onto the rank's GPU - under
    # expert parallelism once AutoEP has kept the rank's experts only
    on_gpu = element_bytes(cfg.train.precision) * arch.held_with_experts_split(cfg.parallel.expert)
    return [f"start-up:    each rank builds the whole model in fp32 on the host "
            f"({mem(4 * arch.params * gpus_per_node)} {mem.name} per node), then DeepSpeed moves it",
            f"             whole onto its GPU before partitioning it ({mem(on_gpu)} {mem.name})"
            + (": TOO BIG, use zero.stage 3, which builds it partitioned" if on_gpu > usable else "")]


def _cross_check(arch: Architecture, estimates: list[Estimate], nodes: int, gpus_per_node: int, precision: str,
                 mem: Units, expert: int) -> list[str]:
    if arch.trainable < arch.params:
        return ["DeepSpeed's estimators (estimate_zero2/3_model_states_mem_needs) assume every parameter trains: "
                "no comparison for a LoRA run."]
    if expert > 1:
        return ["DeepSpeed's estimators (estimate_zero2/3_model_states_mem_needs) know no expert parallelism: no "
                "comparison."]
    lines = ["DeepSpeed's estimators (estimate_zero2/3_model_states_mem_needs) vs ours: GPU model states with the",
             "optimizer step's fp32 gradients. At stage 3 DeepSpeed adds 4 B x the largest layer "
             f"({_count(arch.largest_layer)} parameters;",
             "our buffers count the gathered layers) and leaves out the 16-bit gradient partition DeepSpeed keeps",
             "(2 B per parameter / N): ours/theirs = 20/18 = 1.11 at 16-bit."]
    if precision == "fp32":
        lines.append("DeepSpeed's estimators assume 16-bit training; this run trains in fp32.")
    if any(est.accumulate == "fp32" and precision != "fp32" for est in estimates):
        lines.append("They also assume gradients summed in 16 bits; this run sums them in fp32 at stages 1-3 "
                     "(train.grad_accum_dtype).")
    for est in estimates:
        theirs = deepspeed_estimate(arch, est.option, nodes, gpus_per_node)
        if theirs is None:
            continue
        gpu, largest = theirs
        ours = est.states + max(est.step, 0)
        ratio = f"{ours / (gpu - largest):.2f}" if gpu > largest else ("-" if ours else "both 0")
        lines.append(f"  {str(est.option):<34}ours {mem(ours):>6} {mem.name}   DeepSpeed {mem(gpu - largest):>6} "
                     f"{mem.name}" + (f" + {mem(largest)} largest layer" if largest else " " * 20)
                     + f"   ours/theirs {ratio}")
    return lines
