"""Build any transformers model for the config's task, describe its architecture without memory, and its loss.

Tasks: `causal_lm` (AutoModelForCausalLM, next-token prediction) and `classification`
(AutoModelForSequenceClassification: a linear head on the encoder's pooled output, cross-entropy on labels).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig, \
    PreTrainedModel

from trainer.config import ConfigError, ModelSection

AUTO_MODELS = {"causal_lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}
# attention that a sequence group can share: eager needs a dense mask, flex would be given a plain causal one
SEQUENCE_SPLIT_ATTENTIONS = ("sdpa", "flash_attention_2", "flash_attention_3")


def model_config(section: ModelSection, vocab_size: int, labels: list[str] | None = None,
                 pad_token_id: int | None = None) -> PretrainedConfig:
    """The architecture: from `init_from`'s folder, or `type` + `config`, with the data's vocabulary; for
    classification also the label names (saved with the model: an export knows what its outputs mean)."""
    if section.init_from is None:
        try:
            config = AutoConfig.for_model(section.type, **section.config, vocab_size=vocab_size)
        except (ValueError, StrictDataclassError) as e:  # transformers' own checks, e.g. heads vs hidden size
            cause = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
            raise ConfigError(f"model.config: {cause}") from None
    else:
        try:
            config = AutoConfig.from_pretrained(section.init_from)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init_from: {section.init_from}: {str(e).splitlines()[0]}") from None
        if config.vocab_size != vocab_size:
            raise ConfigError(f"model.init_from: the model's vocabulary ({config.vocab_size}) is not the data's "
                              f"tokenizer's ({vocab_size}); prepare the data with tokenizer.path: {section.init_from}")
    if section.attention is not None:
        config._attn_implementation = section.attention
    if section.task == "classification":
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = pad_token_id  # decoder models classify from the last token before padding
    return config


def build_model(section: ModelSection, config: PretrainedConfig) -> PreTrainedModel:
    """The model to train: the weights of `init_from` (a fresh head for classification), or a fresh
    initialisation. Under a live `HfDeepSpeedConfig` of stage 3, transformers builds it partitioned."""
    auto = AUTO_MODELS[section.task]
    if section.init_from is not None:
        # fp32 like a fresh model: DeepSpeed makes its own bf16/fp16 copy and keeps fp32 master weights.
        # A head of another label count (fine-tuning a fine-tuned model) is replaced.
        model = auto.from_pretrained(section.init_from, config=config, dtype=torch.float32,
                                     ignore_mismatched_sizes=section.task == "classification")
    else:
        model = auto.from_config(config)
    if section.gradient_checkpointing:
        # Non-reentrant: the variant that works with ZeRO-3's parameter gathering and needs no input grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass(frozen=True)
class Architecture:
    """The model's shape, from a build on the meta device: what FLOPs, bucket sizes and memory plans need."""

    params: int
    embedding: int  # input embedding parameters
    lm_head: int  # output layer parameters; 0 when tied to the input embedding, or none (classification)
    tied: bool  # the output layer is the input embedding: it multiplies there
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's stage-3 estimator unit)
    sizes: tuple[int, ...]  # every parameter's numel, in model order (stage 3 keeps the small ones whole)
    layers: int
    hidden: int
    heads: int
    kv_dim: int  # key/value heads x head dim
    intermediate: int
    gated_mlp: bool
    vocab: int
    attention: str  # the attention implementation transformers chose: sdpa, eager, flash_attention_2, ...
    tensor_split: int  # parameters parallel.tensor splits: the linear layers of the model's tensor-parallel plan

    def held(self, tensor: int) -> int:
        """Parameters one rank of a tensor group of `tensor` holds: its slice of the split layers, and the rest
        (input embedding, norms) whole."""
        return self.params - self.tensor_split + self.tensor_split // tensor

    @property
    def multiplying(self) -> int:
        """Parameters that take part in matmuls: the input embedding is only a lookup, unless it is tied to
        the output layer."""
        return self.params - (0 if self.tied else self.embedding)


def attention_of(config: PretrainedConfig) -> str:
    """The attention implementation the model will use: model.attention, else transformers' default, sdpa."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def _on_meta(section: ModelSection, config: PretrainedConfig) -> PreTrainedModel:
    """The model with meta tensors: shapes without memory, so a 70B model builds in seconds. Its shapes do not
    depend on the attention kernel: built with sdpa where the run's needs a package this machine may lack."""
    from accelerate import init_empty_weights

    if attention_of(config).startswith("flash_attention"):
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"
    with init_empty_weights():
        model = AUTO_MODELS[section.task].from_config(config)
    model.tie_weights()  # under init_empty_weights transformers 5 leaves tied embeddings as two parameters
    return model


def check_runs(section: ModelSection, config: PretrainedConfig, micro_batch_size: int, seq_len: int) -> None:
    """Pre-flight: shapes transformers accepts but cannot run fail here, naming the key, not inside a rank. The
    position limit is checked by value (a meta tensor holds no indices to overflow); everything else by running
    the model once on the meta device at the run's shapes (no memory, no compute)."""
    where = f"model.init_from's model ({section.init_from})" if section.init_from else "model.config"
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds the model's position limit ({limit}, "
                          f"max_position_embeddings of {where}); lower data.seq_len or raise the limit")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(f"model.config.num_key_value_heads: {kv_heads} does not divide num_attention_heads "
                          f"({heads}): each key/value head serves a whole group of attention heads")
    run_on_meta(section, config, micro_batch_size, seq_len, where)


def check_attention_installed(section: ModelSection) -> None:
    """Pre-flight on the machine that trains: the kernels of model.attention are installed."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if section.attention in available and not available[section.attention]():
        raise ConfigError(f"model.attention: {section.attention} needs the flash-attn package (and a GPU it "
                          "supports), not available here; use sdpa")


def check_sequence_split(config: PretrainedConfig, size: int) -> None:
    """Pre-flight of parallel.sequence: the model's attention can be split `size` ways."""
    if size == 1:
        return
    attention = attention_of(config)
    if attention not in SEQUENCE_SPLIT_ATTENTIONS:
        raise ConfigError(f"parallel.sequence: {attention} attention cannot be split over a sequence group; set "
                          f"model.attention to one of {', '.join(SEQUENCE_SPLIT_ATTENTIONS)}")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
        config.num_attention_heads
    if heads % size:
        raise ConfigError(f"parallel.sequence: {size} does not divide the model's {heads} attention heads")
    if kv_heads % size and size % kv_heads:
        raise ConfigError(f"parallel.sequence: {size} and the model's {kv_heads} key/value heads do not divide "
                          "one another")


def check_tensor_split(config: PretrainedConfig, size: int) -> None:
    """Pre-flight of parallel.tensor: DeepSpeed's AutoTP follows the model's transformers tensor-parallel plan
    (column-split q/k/v and MLP inputs, row-split outputs), which needs every split dimension divisible."""
    if size == 1:
        return
    if not getattr(config, "base_model_tp_plan", None):
        raise ConfigError(f"parallel.tensor: transformers has no tensor-parallel plan for {config.model_type} "
                          "models (Llama, Mistral, Qwen2 have one); use data parallelism")
    dims = {"attention heads": config.num_attention_heads,
            "key/value heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "MLP width (intermediate_size)": config.intermediate_size, "vocabulary": config.vocab_size}
    for name, value in dims.items():
        if value % size:
            raise ConfigError(f"parallel.tensor: {size} does not divide the model's {name} ({value})")


def run_on_meta(section: ModelSection, config: PretrainedConfig, micro_batch_size: int, seq_len: int,
                where: str = "model.config") -> None:
    """One forward pass at the run's shapes on the meta device: whatever shape does not fit raises here."""
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids} if section.task == "causal_lm" else {"input_ids": ids, "attention_mask": ids}
    try:
        with torch.no_grad():
            _on_meta(section, config)(**inputs)
    except Exception as e:  # noqa: BLE001 - whatever the model raises, the config is what cannot run
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "meta" in cause.lower():  # the model reads a value (e.g. `.item()`): not checkable without data
            return
        raise ConfigError(f"{where}: the model cannot run {micro_batch_size} x {seq_len} tokens ({cause})") from None


def architecture(section: ModelSection, config: PretrainedConfig) -> Architecture:
    model = _on_meta(section, config)
    params = list(model.parameters())  # a tied (shared) parameter is listed once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Architecture(
        params=sum(p.numel() for p in params),
        embedding=embedding.numel(),
        lm_head=0 if head is None or head.weight is embedding else head.weight.numel(),
        tied=head is not None and head.weight is embedding,
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        sizes=tuple(p.numel() for p in params),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        or 4 * config.hidden_size,
        gated_mlp=any(name.rsplit(".", 1)[-1] in ("gate_proj", "w1", "gate_up_proj")
                      for name, _ in model.named_modules()),
        vocab=config.vocab_size,
        attention=attention_of(config),
        tensor_split=_tensor_split(model, config),
    )


def _tensor_split(model: PreTrainedModel, config: PretrainedConfig) -> int:
    """Parameters in the layers transformers' tensor-parallel plan splits (what DeepSpeed's AutoTP follows), and
    the output layer unless it is the (replicated) input embedding."""
    plan = getattr(config, "base_model_tp_plan", None) or {}
    split = {id(p): p.numel() for name, module in model.named_modules()
             if any(fnmatch.fnmatch(name, f"*{pattern}") for pattern in plan) for p in module.parameters()}
    head = model.get_output_embeddings()
    if plan and head is not None and head.weight is not model.get_input_embeddings().weight:
        split[id(head.weight)] = head.weight.numel()
    return sum(split.values())


# train.loss_chunk_tokens' default: chunks of this many bytes of fp32 logits, when the whole exceeds AUTO_CHUNKING
CHUNK_BYTES, AUTO_CHUNKING = 2**26, 2**29


def loss_chunk(tokens_per_micro_batch: int, vocab_size: int, configured: int | None) -> int | None:
    """Tokens per chunk of the causal-LM loss (train.loss_chunk_tokens), None for the whole micro-batch at once."""
    if configured is not None:
        return configured or None
    if 4 * tokens_per_micro_batch * vocab_size <= AUTO_CHUNKING:
        return None
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def fp32_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each token's cross-entropy, the logits upcast to fp32 (under train.compile: one fused kernel)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def lm_loss(model, batch: torch.Tensor, eos_id: int | None = None, shard=None, chunk: int | None = None,
            cross_entropy: Callable = fp32_cross_entropy) -> torch.Tensor:
    """Next-token cross-entropy on packed samples of seq_len + 1 tokens. With `eos_id` (data.document_masking)
    each document of a sample is trained as if alone: positions restart after every eos, attention stays within
    a document and nothing is predicted from an eos (the next document's first token is not its continuation).
    With `shard` (trainer.sequence_parallel.SequenceShard) this rank runs its slice of every sequence. With
    `chunk`, the cross-entropy takes that many tokens at a time (token_losses). `cross_entropy`: the per-token
    fp32 cross-entropy to use (train.compile passes a compiled one)."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    if eos_id is None and shard is None:
        logits = model(input_ids=inputs).logits
        return token_losses(logits, labels, chunk, cross_entropy).mean()
    # transformers reads restarting position_ids as packed documents when no attention mask (and no cache) is
    # given: sdpa, eager and flex get a block-diagonal causal mask, flash-attention its variable-length kernel.
    if eos_id is None:
        positions, predicted = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs), None
    else:
        positions, predicted = document_positions(inputs, eos_id), inputs != eos_id
    count = inputs.numel() if predicted is None else predicted.sum().clamp(min=1)
    if shard is not None:  # positions and labels belong to the whole sequence: cut after they are known
        inputs, labels, positions = shard.cut(inputs), shard.cut(labels), shard.cut(positions)
        predicted = None if predicted is None else shard.cut(predicted)
    logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    losses = token_losses(logits, labels, chunk, cross_entropy)
    part = (losses if predicted is None else losses * predicted.flatten()).sum() / count
    return part if shard is None else shard.whole(part)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, chunk: int | None = None,
                 cross_entropy: Callable = fp32_cross_entropy) -> torch.Tensor:
    """Each token's cross-entropy, in fp32. With `chunk`, that many tokens at a time, each chunk checkpointed:
    backward recomputes its fp32 logits and log-softmax instead of keeping them, so only the model's own
    (16-bit) logits stay alive over the micro-batch - not their fp32 copy and log-softmax (8 B per logit)."""
    logits, labels = logits.flatten(0, 1), labels.flatten()
    if chunk is None or chunk >= len(labels):
        return cross_entropy(logits, labels)
    return torch.cat([checkpoint(cross_entropy, part, target, use_reentrant=False)
                      for part, target in zip(logits.split(chunk), labels.split(chunk))])


def document_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position within its document: 0 at a sample's first token and after every eos."""
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0], starts[:, 1:] = True, inputs[:, :-1] == eos_id
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def check_document_masking(config: PretrainedConfig) -> None:
    """data.document_masking relies on the model building its attention mask with transformers' masking_utils
    from the position_ids it is given; a model that does not would attend across documents without a word."""
    mapping = AutoModelForCausalLM._model_mapping
    model_class = mapping[type(config)] if type(config) in mapping else None
    takes_positions = model_class is not None and "position_ids" in inspect.signature(model_class.forward).parameters
    if not (takes_positions and re.search(r"\bcreate_(sliding_window_)?causal_mask\b",
                                          inspect.getsource(inspect.getmodule(model_class)))):
        raise ConfigError(f"data.document_masking: model type {config.model_type} does not build its attention "
                          "mask from position_ids (transformers' create_causal_mask), so documents could not be "
                          "kept apart; set data.document_masking: false for this model")


def classification_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the head's logits against the labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"])

