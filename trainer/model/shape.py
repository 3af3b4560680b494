"""A model's shape without memory (built on the meta device): what FLOPs, bucket sizes and memory plans need,
and the pre-flight checks of what transformers accepts but cannot run at the run's shapes or parallel degrees."""

from __future__ import annotations

import copy
import fnmatch
import inspect
import re
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from trainer.config import ConfigError, ModelSection
from trainer.model.moe import Routing, check_routing, routing

# attention that a sequence group can share: eager needs a dense mask, flex would be given a plain causal one
SEQUENCE_SPLIT_ATTENTIONS = ("sdpa", "flash_attention_2", "flash_attention_3")


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
    trainable: int  # parameters that get gradients and optimizer states: all, or with model.lora its adapters
    linear: int  # weights of the linear layers but the output layer: what model.lora.quantize stores in 4 bits
    expert_weights: int = 0  # a mixture of experts' routed experts, every layer's (0: a dense model)
    routing: Routing | None = None  # a mixture of experts' experts per layer and top-k

    def held(self, tensor: int) -> int:
        """Parameters one rank of a tensor group of `tensor` holds: its slice of the split layers, and the rest
        (input embedding, norms) whole."""
        return self.params - self.tensor_split + self.tensor_split // tensor

    @property
    def multiplying(self) -> int:
        """Parameters that take part in a token's matmuls: the input embedding is only a lookup, unless it is
        tied to the output layer; of a mixture of experts' routed experts, the top-k the token goes to."""
        return self.params - (0 if self.tied else self.embedding) - self.idle_experts

    @property
    def idle_experts(self) -> int:
        """Routed expert weights a token does not use: all but its top-k experts of each layer."""
        moe = self.routing
        return 0 if moe is None else round(self.expert_weights * (1 - moe.top_k / moe.experts))

    def held_with_experts_split(self, expert: int) -> int:
        """Parameters one rank holds when parallel.expert splits every layer's experts `expert` ways."""
        return self.params - self.expert_weights + self.expert_weights // expert


def attention_of(config: PretrainedConfig) -> str:
    """The attention implementation the model will use: model.attention, else transformers' default, sdpa."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def on_meta(auto, config: PretrainedConfig) -> PreTrainedModel:
    """The model with meta tensors: shapes without memory, so a 70B model builds in seconds. Its shapes do not
    depend on the kernels: built with sdpa where the run's attention needs a package this machine may lack, and
    a mixture of experts with transformers' batched-matmul experts (the grouped-GEMM ones it may choose have meta
    kernels for bf16 only, and a loop over experts reads which tokens go where: data)."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)
    if attention_of(config).startswith("flash_attention"):
        config._attn_implementation = "sdpa"
    if routing(config):
        config._experts_implementation = "batched_mm"
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()  # under init_empty_weights transformers 5 leaves tied embeddings as two parameters
    return model


def check_runs(section: ModelSection, config: PretrainedConfig, auto, inputs: dict[str, torch.Tensor]) -> None:
    """Pre-flight: shapes transformers accepts but cannot run fail here, naming the key, not inside a rank. The
    position limit is checked by value (a meta tensor holds no indices to overflow); everything else by running
    the model (of Auto class `auto`) once on the meta device with `inputs`, the task's at the run's shapes (no
    memory, no compute)."""
    seq_len = inputs["input_ids"].shape[1]
    where = f"model.init_from's model ({section.init_from})" if section.init_from else "model.config"
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds the model's position limit ({limit}, "
                          f"max_position_embeddings of {where}); lower data.seq_len or raise the limit")
    check_routing(config, where)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(f"model.config.num_key_value_heads: {kv_heads} does not divide num_attention_heads "
                          f"({heads}): each key/value head serves a whole group of attention heads")
    run_on_meta(auto, config, inputs, where)


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


def run_on_meta(auto, config: PretrainedConfig, inputs: dict[str, torch.Tensor], where: str = "model.config") \
        -> None:
    """One forward pass with `inputs` (meta tensors at the run's shapes) on the meta device: whatever shape does
    not fit raises here."""
    try:
        with torch.no_grad():
            on_meta(auto, config)(**inputs)
    except Exception as e:  # noqa: BLE001 - whatever the model raises, the config is what cannot run
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "meta" in cause.lower():  # the model reads a value (e.g. `.item()`): not checkable without data
            return
        shape = " x ".join(map(str, inputs["input_ids"].shape))
        raise ConfigError(f"{where}: the model cannot run {shape} tokens: tried on the meta device before any rank "
                          f"starts, it fails with: {cause}") from None


def architecture(auto, config: PretrainedConfig, section: ModelSection | None = None) -> Architecture:
    """The shape of the model of Auto class `auto` and `config`; with `section.lora`, of the model with its
    adapters (checked: a ConfigError names a setting that cannot wrap it)."""
    model = on_meta(auto, config)
    trainable = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output)
    if section is not None and section.lora is not None:
        from accelerate import init_empty_weights

        from trainer.model.lora import add_adapters, check_adapters

        with init_empty_weights():
            model = add_adapters(model, section.lora, section.task, seed=0)
        check_adapters(model, section.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
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
        intermediate=_mlp_width(config),
        gated_mlp=any(name.rsplit(".", 1)[-1] in ("gate_proj", "w1", "gate_up_proj")
                      for name, _ in model.named_modules()),
        vocab=config.vocab_size,
        attention=attention_of(config),
        tensor_split=_tensor_split(model, config),
        trainable=trainable,
        linear=linear,
        **_experts(model, config),
    )


def _mlp_width(config: PretrainedConfig) -> int:
    """The MLP width a token passes through: a mixture of experts' top-k experts (and its shared experts)."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    moe = routing(config)
    if moe is None:
        return width
    expert = getattr(config, "moe_intermediate_size", None) or width
    shared = getattr(config, "shared_expert_intermediate_size", None) or \
        (getattr(config, "n_shared_experts", None) or 0) * expert
    return moe.top_k * expert + shared


def _experts(model: PreTrainedModel, config: PretrainedConfig) -> dict:
    """A mixture of experts' routed expert weights (transformers 5 keeps a layer's in one `experts` module) and
    its routing."""
    moe = routing(config)
    if moe is None:
        return {}
    weights = sum(p.numel() for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"
                  for p in module.parameters())
    return {"expert_weights": weights, "routing": moe}


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
