"""The memory model of a run: what each rank holds for every ZeRO stage and offload, worked out without a GPU.

`zerotrain plan` prints it for a cluster shape; the pre-flight checks the configured run against the memory
that will hold it.

The model is built on the meta device (accelerate's `init_empty_weights`: exact parameter counts, no memory).
From it, the run config and the cluster shape (nodes x GPUs per node = the data-parallel world size N) come:

- Model states per rank for every ZeRO stage and offload choice, by the ZeRO paper's mixed-precision Adam
  accounting: per parameter 2 B 16-bit weights + 2 B gradients + 12 B optimizer states (4 B fp32 master + 8 B
  Adam moments), the partitioned parts divided by N. fp32 training: 4 + 4 + 8 B, plus the separate 4 B fp32 master
  partition DeepSpeed keeps at stages 1-3. What DeepSpeed allocates on top (measured on CPU, see
  tests/launcher/test_plan.py): an fp32 copy of the gradients for the optimizer step; at stage 3 its reduce bucket and the
  small "persistent" parameters kept whole on every rank. Gradients summed over micro-batches in fp32 under
  bf16 (train.grad_accum_dtype's default at stages 1-3) take 4 B: at stage 1 DeepSpeed's BF16_Optimizer keeps
  every gradient in fp32 beside its bf16 one (and steps with it in place), at stages 2-3 the gradient
  partition is fp32 (at stage 2 the optimizer steps with it in place).
- DeepSpeed's buffers, from the DeepSpeed config zerotrain writes (trainer/engine/deepspeed_config.py) read back through
  DeepSpeed's own config class, so its defaults apply: gradient reduce buckets (two with overlap_comm), and at
  stage 3 the gathered parameters (up to max_live_parameters + prefetch_bucket_size).
- Activations per micro-batch, counted for Hugging Face Llama-style layers like Korthikanti et al. 2022 count
  GPT layers (they get s·b·h·(34 + 5·a·s/h) B per layer in 16-bit). Per token, e = bytes per element:
      2 RMSNorms x (4h fp32 input + e·h normalised + e·h output)   [the norms compute in fp32]
    + e·(3h + 2kv)   q, k, v for the attention kernel, its output, the output projection's input
    + 4e·i           gated MLP: gate, SiLU(gate), up, their product (2e·i for a plain MLP)
    + (4 + e)·a·s    only with eager attention (scores and softmax kept; SDPA/flash recompute them)
  = 22h + 4kv + 8i B per token and layer for bf16 with SDPA, plus the head: final norm (4 + 2e)·h and the logits
  (e·V, their fp32 copy 4V and its log-softmax 4V; only e·V with a chunked loss, train.loss_chunk_tokens). Full
  activation checkpointing keeps e·h per layer (its input) plus one layer's activations recomputed during backward.
- Peak per GPU = model states + resident buffers + max(backward buffers + activations, the optimizer step's fp32
  gradients); it must fit in the GPU's memory less MARGIN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import Config, ConfigError, ZeroSection
from trainer.engine.deepspeed_config import allreduce_buffer_elements, deepspeed_config, zero_config
from trainer.engine.limits import accumulation_dtype
from trainer.model import shape
from trainer.model.shape import Architecture
from trainer.parallel.layout import ParallelLayout
from trainer.tasks import task_of
from trainer.tasks.causal_lm import loss_chunk

GiB = 2**30


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
    """The run's model on the meta device; what it takes of the data (a classifier's labels) the task's stand-in
    gives."""
    task = task_of(cfg)
    return shape.architecture(task.auto_model, task.model_config(cfg.model, vocab_size or vocab_size_of(cfg)),
                              cfg.model)


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_bytes(arch: Architecture, precision: str, micro_batch: int, seq_len: int,
                     checkpointing: bool = False, tensor: int = 1, chunked_loss: bool = False) -> int:
    """Activations kept for backward by one micro-batch (formula in the module docstring). A rank of a tensor
    group of `tensor` keeps its heads' and its MLP slice's share; the norms' and the head's are whole. A chunked
    loss (train.loss_chunk_tokens) keeps the model's logits only, not their fp32 copy and log-softmax."""
    e, h = element_bytes(precision), arch.hidden
    scores = (4 + e) * arch.heads * seq_len if arch.attention == "eager" else 0
    split = e * (3 * h + 2 * arch.kv_dim) + (4 if arch.gated_mlp else 2) * e * arch.intermediate + scores
    layer = 2 * (4 + 2 * e) * h + split // tensor
    logits = e if chunked_loss else e + 4 + (4 if e < 4 else 0)  # fp32 logits need no copy
    head = (4 + 2 * e) * h + logits * arch.vocab
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
    save_copy: int  # CPU memory an asynchronous save holds while it is written (rank 0's, the largest)
    accumulate: str  # the dtype gradients are summed in over micro-batches (Config.grad_accum_dtype)

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    def peak(self, checkpointing: bool = False) -> int:
        activations = self.activations_checkpointed if checkpointing else self.activations
        return self.states + self.resident + max(self.transient + activations, self.step)


def zero_section_of(cfg: Config, option: Option, nodes: int, gpus_per_node: int, n_params: int,
                    trainable: int | None = None):
    """DeepSpeed's parsed `zero_optimization` section of the config zerotrain would write for this run."""
    launch = cfg.launch.model_copy(update={"nnodes": nodes, "nproc_per_node": gpus_per_node})
    run = cfg.model_copy(update={"zero": option.zero_section(), "launch": launch})
    return zero_config(deepspeed_config(run, n_params, trainable=trainable))


def persistent_params(arch: Architecture, zero) -> int:
    """Stage 3 keeps parameters up to param_persistence_threshold elements whole on every rank."""
    kept = 0
    for n in arch.sizes:
        if n <= zero.param_persistence_threshold and kept + n <= zero.model_persistence_threshold:
            kept += n
    return kept


def model_states(precision: str, option: Option, n_params: int, world: int, accumulate: str | None = None) \
        -> tuple[int, int, int, int, int]:
    """(params, grads, optimizer, step, host) bytes per rank: the model states on the GPU, what the optimizer step
    adds to them (DeepSpeed hands the optimizer fp32 gradients), and the host memory of offloaded states.
    `accumulate`: the dtype gradients are summed in over micro-batches (Config.grad_accum_dtype; default the
    precision)."""
    w = g = element_bytes(precision)
    a = element_bytes(accumulate or precision)
    # fp32 training at stage 0 updates the weights in place; every other case keeps an fp32 master copy
    optimizer = (0 if precision == "fp32" and option.stage == 0 else 4) + 8
    P, part = n_params, math.ceil(n_params / world)
    if option.stage == 0:  # DeepSpeed's unfused 16-bit optimizer copies every gradient to fp32 for the step
        return w * P, g * P, optimizer * P, 4 * P if w == 2 else 0, 0
    params = w * part if option.stage == 3 else w * P
    if option.offload_optimizer:  # fp32 master, moments and gradients on the host; reduced gradients go there
        host = (optimizer + 4) * part + (w * part if option.offload_param else 0)
        grads = (g + (a if a > g else 0)) * P if option.stage == 1 else 0  # stage 1: + their fp32 sums
        return 0 if option.offload_param else params, grads, 0, 0, host
    if option.stage == 1 and a > g:  # DeepSpeed's BF16_Optimizer: every gradient in fp32 beside the 16-bit one,
        return params, (g + a) * P, optimizer * part, 0, 0  # which its step then uses in place (measured)
    grads = g * P if option.stage == 1 else a * part  # stage 1 reduces them only once backward is over
    if option.stage == 2 and a > g:  # the fp32 gradient partition is what the optimizer steps with
        return params, grads, optimizer * part, 0, 0
    # stage 1 reduces the gradients straight into the fp32 partition and frees the 16-bit ones
    step = 4 * part - (g * P if option.stage == 1 else 0)
    return params, grads, optimizer * part, step, 0


# NF4 (model.lora.quantize): 4 bits per weight and an fp32 scale (absmax) per block of 64
NF4_BYTES = 0.5 + 4 / 64


def frozen_weights(precision: str, option: Option, frozen: int, world: int, quantized: int = 0) -> tuple[int, int]:
    """(GPU, host) bytes per rank of `frozen` parameters (a LoRA run's base): 16-bit (or fp32) weights without
    gradients or optimizer states, partitioned at stage 3, on the host with offloaded parameters. `quantized`:
    of them, the weights held in 4 bits (QLoRA; stages 0-2)."""
    if quantized:
        return int(NF4_BYTES * quantized) + element_bytes(precision) * (frozen - quantized), 0
    weights = element_bytes(precision) * (math.ceil(frozen / world) if option.stage == 3 else frozen)
    return (0, weights) if option.offload_param else (weights, 0)


def buffers(arch: Architecture, held: int, trained: int, precision: str, option: Option, zero, world: int) \
        -> tuple[int, int]:
    """(resident, transient) DeepSpeed buffer bytes per rank, which holds `held` parameters (its tensor slice),
    `trained` of them with gradients, and shares them with `world` data-parallel ranks."""
    e, P = element_bytes(precision), held
    if option.stage == 0:  # the engine all-reduces gradients flattened into buffers of this many elements
        return 0, e * min(trained, allreduce_buffer_elements()) if world > 1 else 0
    if option.stage == 1:  # reduced at the end of backward, a flattened bucket at a time
        return 0, e * min(trained, zero.reduce_bucket_size)
    if option.stage == 2:  # contiguous gradient buckets, double-buffered with overlap_comm
        count = 2 if zero.contiguous_gradients and zero.overlap_comm else 1
        return 0, count * e * zero.reduce_bucket_size
    # one process holds a persistent parameter once; with more, its whole copy sits beside its partition
    persistent = persistent_params(arch, zero) if world > 1 else 0
    gathered = min(P - persistent, zero.max_live_parameters + zero.prefetch_bucket_size)
    return e * zero.reduce_bucket_size + e * persistent, e * gathered


def estimate(cfg: Config, arch: Architecture, option: Option, nodes: int, gpus_per_node: int) -> Estimate:
    t, tensor, expert = cfg.train, cfg.parallel.tensor, cfg.parallel.expert
    layout = ParallelLayout(nodes * gpus_per_node, cfg.parallel.sequence, tensor)
    # ZeRO partitions a rank's tensor slice over the ranks holding the same slice
    held, world = arch.held(tensor), layout.zero_world
    trained = min(held, arch.trainable)  # model.lora: the adapters; the frozen rest has weights only
    accumulate = accumulation_dtype(t, option.stage)
    if expert > 1:  # 1/expert of the experts on each rank, partitioned over the world / expert ranks holding them
        experts, held = arch.expert_weights // expert, arch.held_with_experts_split(expert)
        trained = held  # no LoRA with expert parallelism
        params, grads, optimizer, step, host = (a + b for a, b in zip(
            model_states(t.precision, option, held - experts, world, accumulate),
            model_states(t.precision, option, experts, world // expert, accumulate), strict=True))
    else:
        params, grads, optimizer, step, host = model_states(t.precision, option, trained, world, accumulate)
    quantized = arch.linear if cfg.model.lora and cfg.model.lora.quantize else 0
    frozen, frozen_host = frozen_weights(t.precision, option, held - trained, world, quantized)
    params, host = params + frozen, host + frozen_host
    zero = zero_section_of(cfg, option, nodes, gpus_per_node, held, trained)
    resident, transient = buffers(arch, held, trained, t.precision, option, zero, world)
    # A rank of a sequence group holds its slice of every activation; attention holds the whole sequence with
    # that share of the heads: the same bytes. The document mask spans the whole sequence.
    tokens = cfg.data.seq_len // cfg.parallel.sequence
    chunked = loss_chunk(cfg.rank_tokens, arch.vocab, t.loss_chunk_tokens) is not None
    return Estimate(option, params, grads, optimizer, resident, transient, step,
                    activation_bytes(arch, t.precision, t.micro_batch_size, tokens, False, tensor, chunked)
                    + document_mask_bytes(cfg, arch),
                    activation_bytes(arch, t.precision, t.micro_batch_size, tokens, True, tensor, chunked)
                    + document_mask_bytes(cfg, arch, checkpointing=True),
                    host, save_copy_bytes(trained, t.precision, option, world), accumulate)


def document_mask_bytes(cfg: Config, arch: Architecture, checkpointing: bool = False) -> int:
    """data.document_masking gives sdpa and eager attention a boolean micro_batch x seq_len x seq_len mask (the
    whole sequence's, also under parallel.sequence), which each layer's attention turns into an additive mask
    of the compute dtype and keeps for backward (measured on CPU: bench/sequence_parallel.py). Quadratic in
    seq_len: at long sequences use flash-attention, whose variable-length kernel needs no mask, as flex does."""
    if not (cfg.data.document_masking and arch.attention in ("sdpa", "eager")):
        return 0
    layers = 1 if checkpointing else arch.layers
    return cfg.train.micro_batch_size * cfg.data.seq_len ** 2 * (1 + layers * element_bytes(cfg.train.precision))


def save_copy_bytes(held: int, precision: str, option: Option, world: int) -> int:
    """The host copy of rank 0's share of a checkpoint, which an asynchronous save (checkpoint.async) holds until
    it is written: its part of the fp32 master weights and Adam moments (all of them at stage 0), and the 16-bit
    weights - its partition at stage 3, all of them at stages 0-2, where rank 0 writes the model file. `held`:
    the parameters of its tensor slice, shared with `world` data-parallel ranks."""
    part = math.ceil(held / world)
    optimizer = 12 * (held if option.stage == 0 else part)
    return optimizer + element_bytes(precision) * (part if option.stage == 3 else held)


def recommend(estimates: list[Estimate], usable: float) -> tuple[Estimate, bool] | None:
    """The lowest stage that fits without offload, else with offload; failing both, the same with activation
    checkpointing. Stages that sum gradients in fp32 come first: under bf16, DeepSpeed sums them in bf16
    at stage 0. Returns (estimate, needs checkpointing) or None."""
    for exact in (True, False):
        for checkpointing in (False, True):
            for offload in (False, True):
                for est in estimates:
                    if (est.accumulate == "fp32") == exact and est.option.offload_optimizer == offload and \
                            est.peak(checkpointing) <= usable:
                        return est, checkpointing
    return None
