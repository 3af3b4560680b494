"""`zerotrain plan`: what a run needs of each GPU, worked out before a cluster is spent on it.

The model is built on the meta device (accelerate's `init_empty_weights`: exact parameter counts, no memory).
From it, the run config and the cluster shape (nodes x GPUs per node = the data-parallel world size N) come:

- FLOPs per token: 6N' + 12·L·h·s (PaLM appendix B, Megatron-LM), N' = the parameters that multiply (all but
  the input embedding, a lookup); like those papers the attention term counts the whole s x s score matrix.
- Model states per rank for every ZeRO stage and offload choice, by the ZeRO paper's mixed-precision Adam
  accounting: per parameter 2 B 16-bit weights + 2 B gradients + 12 B optimizer states (4 B fp32 master + 8 B
  Adam moments), the partitioned parts divided by N. fp32 training: 4 + 4 + 8 B, plus the separate 4 B fp32 master
  partition DeepSpeed keeps at stages 1-3. What DeepSpeed 0.19 allocates on top (measured on CPU, see
  tests/test_plan.py): an fp32 copy of the gradients for the optimizer step; at stage 3 its reduce bucket and the
  small "persistent" parameters kept whole on every rank.
- DeepSpeed's buffers, from the DeepSpeed config zerotrain writes (trainer/deepspeed_config.py) read back through
  DeepSpeed's own config class, so its defaults apply: gradient reduce buckets (two with overlap_comm), and at
  stage 3 the gathered parameters (up to max_live_parameters + prefetch_bucket_size).
- Activations per micro-batch, counted for Hugging Face Llama-style layers like Korthikanti et al. 2022 count
  GPT layers (they get s·b·h·(34 + 5·a·s/h) B per layer in 16-bit). Per token, e = bytes per element:
      2 RMSNorms x (4h fp32 input + e·h normalised + e·h output)   [the norms compute in fp32]
    + e·(3h + 2kv)   q, k, v for the attention kernel, its output, the output projection's input
    + 4e·i           gated MLP: gate, SiLU(gate), up, their product (2e·i for a plain MLP)
    + (4 + e)·a·s    only with eager attention (scores and softmax kept; SDPA/flash recompute them)
  = 22h + 4kv + 8i B per token and layer for bf16 with SDPA, plus the head: final norm (4 + 2e)·h and the logits
  (e·V, their fp32 copy 4V and its log-softmax 4V). Full activation checkpointing keeps e·h per layer (its input)
  plus one layer's activations recomputed during backward.
- Peak per GPU = model states + resident buffers + max(backward buffers + activations, the optimizer step's fp32
  gradients); it must fit in the GPU's memory less MARGIN.

The numbers of DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`, what the `..._all_cold`
functions print) are shown beside ours.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from trainer.config import Config, ConfigError, ZeroSection
from trainer.model import Architecture, model_config
from trainer.model import architecture as model_architecture
from trainer.perf import flops_per_token

GiB = 2**30
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


# ---------------------------------------------------------------------------------------------------------------
# the model


def vocab_size_of(cfg: Config) -> int:
    """The vocabulary the run will have: init_from's, the tokenizer folder's, or the BPE prepare trains."""
    if cfg.model.init_from is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.model.init_from).vocab_size
    if cfg.tokenizer.path is None:
        return cfg.tokenizer.vocab_size
    from data_pipeline import DataError, load_tokenizer

    try:
        return len(load_tokenizer(cfg.tokenizer.path))
    except DataError as e:
        raise ConfigError(f"tokenizer.path: {e} (the plan needs its vocabulary size)") from None


def architecture(cfg: Config, vocab_size: int | None = None) -> Architecture:
    """The run's model on the meta device. A classification head's label count comes from the data, which
    a plan does not read: two labels stand in (the head is labels x hidden, nothing beside the encoder)."""
    labels = ["0", "1"] if cfg.model.task == "classification" else None
    return model_architecture(cfg.model, model_config(cfg.model, vocab_size or vocab_size_of(cfg), labels))


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_bytes(arch: Architecture, precision: str, micro_batch: int, seq_len: int,
                     checkpointing: bool = False) -> int:
    """Activations kept for backward by one micro-batch (formula in the module docstring)."""
    e, h = element_bytes(precision), arch.hidden
    scores = (4 + e) * arch.heads * seq_len if arch.attention == "eager" else 0
    layer = (2 * (4 + 2 * e) * h + e * (3 * h + 2 * arch.kv_dim) + (4 if arch.gated_mlp else 2) * e
             * arch.intermediate + scores)
    head = (4 + 2 * e) * h + (e + 4 + (4 if e < 4 else 0)) * arch.vocab  # fp32 logits need no copy
    per_token = (arch.layers * e * h + layer if checkpointing else arch.layers * layer) + head
    return micro_batch * seq_len * per_token


# ---------------------------------------------------------------------------------------------------------------
# ZeRO stages and offload


@dataclass(frozen=True)
class Option:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    def __str__(self) -> str:
        offload = " + offload params+optimizer" if self.offload_param else (
            " + offload optimizer" if self.offload_optimizer else "")
        return f"ZeRO-{self.stage}{offload}"

    def zero_section(self) -> ZeroSection:
        return ZeroSection(stage=self.stage, offload_optimizer="cpu" if self.offload_optimizer else "none",
                           offload_param="cpu" if self.offload_param else "none")


OPTIONS = (Option(0), Option(1), Option(1, True), Option(2), Option(2, True), Option(3), Option(3, True),
           Option(3, True, True))


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank. `states` + `resident` stay allocated between steps."""

    option: Option
    params: int  # on the GPU: 16-bit (or fp32) weights
    grads: int
    optimizer: int  # fp32 master weights + Adam moments
    resident: int  # stage 3: the reduce bucket and the persistent (whole) small parameters
    transient: int  # during backward: gradient reduce buckets, stage-3 gathered parameters
    step: int  # what the optimizer step adds: DeepSpeed hands the optimizer fp32 gradients
    activations: int
    activations_checkpointed: int
    host: int  # CPU memory per rank for offloaded states

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    def peak(self, checkpointing: bool = False) -> int:
        activations = self.activations_checkpointed if checkpointing else self.activations
        return self.states + self.resident + max(self.transient + activations, self.step)


def zero_config(cfg: Config, option: Option, nodes: int, gpus_per_node: int, n_params: int):
    """DeepSpeed's parsed `zero_optimization` section of the config zerotrain would write for this run."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from trainer.deepspeed_config import deepspeed_config

    launch = cfg.launch.model_copy(update={"nnodes": nodes, "nproc_per_node": gpus_per_node})
    run = cfg.model_copy(update={"zero": option.zero_section(), "launch": launch})
    return DeepSpeedZeroConfig(**deepspeed_config(run, n_params)["zero_optimization"])


def persistent_params(arch: Architecture, zero) -> int:
    """Stage 3 keeps parameters up to param_persistence_threshold elements whole on every rank."""
    kept = 0
    for n in arch.sizes:
        if n <= zero.param_persistence_threshold and kept + n <= zero.model_persistence_threshold:
            kept += n
    return kept


def model_states(precision: str, option: Option, n_params: int, world: int) -> tuple[int, int, int, int, int]:
    """(params, grads, optimizer, step, host) bytes per rank: the model states on the GPU, what the optimizer step
    adds to them (DeepSpeed hands the optimizer fp32 gradients), and the host memory of offloaded states."""
    w = g = element_bytes(precision)
    # fp32 training at stage 0 updates the weights in place; every other case keeps an fp32 master copy
    optimizer = (0 if precision == "fp32" and option.stage == 0 else 4) + 8
    P, part = n_params, math.ceil(n_params / world)
    if option.stage == 0:  # DeepSpeed's unfused 16-bit optimizer copies every gradient to fp32 for the step
        return w * P, g * P, optimizer * P, 4 * P if w == 2 else 0, 0
    params = w * part if option.stage == 3 else w * P
    if option.offload_optimizer:  # fp32 master, moments and gradients on the host; reduced gradients go there
        host = (optimizer + 4) * part + (w * part if option.offload_param else 0)
        return 0 if option.offload_param else params, g * P if option.stage == 1 else 0, 0, 0, host
    grads = g * P if option.stage == 1 else g * part  # stage 1 reduces them only once backward is over
    # stage 1 reduces the gradients straight into the fp32 partition and frees the 16-bit ones
    step = 4 * part - (g * P if option.stage == 1 else 0)
    return params, grads, optimizer * part, step, 0


def buffers(arch: Architecture, precision: str, option: Option, zero, world: int) -> tuple[int, int]:
    """(resident, transient) DeepSpeed buffer bytes per rank."""
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE

    e, P = element_bytes(precision), arch.params
    if option.stage == 0:  # the engine all-reduces gradients flattened into buffers of this many elements
        return 0, e * min(P, MEMORY_OPT_ALLREDUCE_SIZE) if world > 1 else 0
    if option.stage == 1:  # reduced at the end of backward, a flattened bucket at a time
        return 0, e * min(P, zero.reduce_bucket_size)
    if option.stage == 2:  # contiguous gradient buckets, double-buffered with overlap_comm
        count = 2 if zero.contiguous_gradients and zero.overlap_comm else 1
        return 0, count * e * zero.reduce_bucket_size
    # one process holds a persistent parameter once; with more, its whole copy sits beside its partition
    persistent = persistent_params(arch, zero) if world > 1 else 0
    gathered = min(P - persistent, zero.max_live_parameters + zero.prefetch_bucket_size)
    return e * zero.reduce_bucket_size + e * persistent, e * gathered


def estimate(cfg: Config, arch: Architecture, option: Option, nodes: int, gpus_per_node: int) -> Estimate:
    world, t = nodes * gpus_per_node, cfg.train
    params, grads, optimizer, step, host = model_states(t.precision, option, arch.params, world)
    zero = zero_config(cfg, option, nodes, gpus_per_node, arch.params)
    resident, transient = buffers(arch, t.precision, option, zero, world)
    return Estimate(option, params, grads, optimizer, resident, transient, step,
                    activation_bytes(arch, t.precision, t.micro_batch_size, cfg.data.seq_len),
                    activation_bytes(arch, t.precision, t.micro_batch_size, cfg.data.seq_len, checkpointing=True),
                    host)


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

        # zero_init=False: zerotrain builds the whole model on every rank (it changes only the CPU figure)
        _, gpu, largest = estimate_zero3_model_states_mem_needs(
            arch.params, arch.largest_layer, gpus_per_node, nodes, cpu_offload=option.offload_optimizer,
            cpu_offload_params=option.offload_param, zero_init=False)
        return gpu, largest
    return None


def recommend(estimates: list[Estimate], usable: float) -> tuple[Estimate, bool] | None:
    """The lowest stage that fits without offload, else with offload; failing both, the same with activation
    checkpointing. Returns (estimate, needs checkpointing) or None."""
    for checkpointing in (False, True):
        for offload in (False, True):
            for est in estimates:
                if est.option.offload_optimizer == offload and est.peak(checkpointing) <= usable:
                    return est, checkpointing
    return None


# ---------------------------------------------------------------------------------------------------------------
# the report


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_memory_gib: float, vocab_size: int | None = None) -> str:
    """A printable report: model, compute, per-GPU memory of every ZeRO stage and offload choice, a recommendation,
    and DeepSpeed's own estimates beside ours."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--gpu-memory", gpu_memory_gib)):
        if not value > 0:
            raise ConfigError(f"{flag}: must be more than 0 (got {value})")
    arch = architecture(cfg, vocab_size)
    estimates = [estimate(cfg, arch, option, nodes, gpus_per_node) for option in OPTIONS]
    usable = gpu_memory_gib * (1 - MARGIN) * GiB
    # small models read better in MiB
    mem = Units("GiB", GiB) if max(est.peak() for est in estimates) >= GiB else Units("MiB", 2**20)
    lines = (_header(cfg, arch, estimates[0], nodes, gpus_per_node, gpu_memory_gib, mem)
             + _table(estimates, usable, gpus_per_node, mem)
             + _verdict(cfg, arch, estimates, usable, gpus_per_node, mem)
             + _cross_check(arch, estimates, nodes, gpus_per_node, cfg.train.precision, mem))
    return "\n".join(lines) + "\n"


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


def _header(cfg: Config, arch: Architecture, est: Estimate, nodes: int, gpus_per_node: int,
            gpu_memory_gib: float, mem: Units) -> list[str]:
    t, s, world, e = cfg.train, cfg.data.seq_len, nodes * gpus_per_node, element_bytes(cfg.train.precision)
    per_token = flops_per_token(arch, s)
    embeddings = (f"embeddings {_count(arch.embedding)} in + {_count(arch.lm_head)} out" if arch.lm_head
                  else f"embeddings {_count(arch.embedding)} (tied)")
    per_step = t.micro_batch_size * world
    accumulation = (f"gradient accumulation {t.global_batch_size // per_step}" if t.global_batch_size % per_step == 0
                    else f"NOT a multiple of micro-batch x ranks = {per_step}: zerotrain refuses this run")
    states = ("4 B gradients + 8 B Adam moments (+ a 4 B fp32 master partition at stages 1-3)" if e == 4
              else "2 B gradients + 12 B optimizer states (4 B fp32 master + 8 B Adam moments)")
    return [
        f"zerotrain plan: {cfg.run.name} on {nodes} node(s) x {gpus_per_node} GPU(s) = {world} ranks, "
        f"{gpu_memory_gib:g} GiB per GPU",
        f"model        {cfg.model.type}, {arch.params:,} parameters ({_count(arch.params)}), {embeddings}",
        f"             {arch.layers} layers, hidden {arch.hidden}, {arch.heads} heads (KV dim {arch.kv_dim}), "
        f"MLP {arch.intermediate}{' gated' if arch.gated_mlp else ''}, vocab {arch.vocab}, attention {arch.attention}",
        f"batch        {t.global_batch_size} x {s} = {_count(t.global_batch_size * s)} tokens per step; "
        f"micro-batch {t.micro_batch_size} per rank, {accumulation}",
        f"compute      6 x {_count(arch.multiplying)} + 12 x {arch.layers} x {arch.hidden} x {s} = "
        f"{_flops(per_token)} per token ({12 * arch.layers * arch.hidden * s / per_token:.0%} attention), "
        f"{_flops(per_token * t.global_batch_size * s)} per step",
        f"precision    {t.precision}: per parameter {e} B weights + {states}",
        f"activations  {mem(est.activations)} {mem.name} per micro-batch ({t.micro_batch_size} x {s} tokens); "
        f"{mem(est.activations_checkpointed)} {mem.name} with full activation checkpointing",
        "             (model.gradient_checkpointing: true)",
        "",
    ]


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


def _verdict(cfg: Config, arch: Architecture, estimates: list[Estimate], usable: float, gpus_per_node: int,
             mem: Units) -> list[str]:
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
    lines.append(f"configured:  {configured}" + ("" if same or chosen is None else " (not the recommendation)"))
    # zerotrain builds the whole model on every rank (no deepspeed.zero.Init): in fp32 on the host, and
    # deepspeed.initialize then moves all of it onto the rank's GPU before partitioning it
    on_gpu = element_bytes(cfg.train.precision) * arch.params
    lines += [f"start-up:    each rank builds the whole model in fp32 on the host "
              f"({mem(4 * arch.params * gpus_per_node)} {mem.name} per node), then DeepSpeed moves it",
              f"             whole onto its GPU before partitioning it ({mem(on_gpu)} {mem.name})"
              + (": TOO BIG, build it inside deepspeed.zero.Init" if on_gpu > usable else "")]
    return lines + [""]


def _cross_check(arch: Architecture, estimates: list[Estimate], nodes: int, gpus_per_node: int, precision: str,
                 mem: Units) -> list[str]:
    lines = ["DeepSpeed's estimators (estimate_zero2/3_model_states_mem_needs) vs ours: GPU model states with the",
             "optimizer step's fp32 gradients. At stage 3 DeepSpeed adds 4 B x the largest layer "
             f"({_count(arch.largest_layer)} parameters;",
             "our buffers count the gathered layers) and leaves out the 16-bit gradient partition DeepSpeed keeps",
             "(2 B per parameter / N): ours/theirs = 20/18 = 1.11 at 16-bit."]
    if precision == "fp32":
        lines.append("DeepSpeed's estimators assume 16-bit training; this run trains in fp32.")
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
