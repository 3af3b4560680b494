"""Mixture-of-experts models (Mixtral, Qwen3-MoE, DeepSeek, ...): their routing, the router's load-balancing loss
and the experts' load while training. Expert parallelism (DeepSpeed's AutoEP) is the engine's:
trainer/engine/autoep.py.

transformers 5 stores each layer's experts as one module of 3-D weights (experts x out x in) that every token's
layer calls, whichever experts its tokens chose. So ZeRO 3 gathers and partitions them like any layer, and a rank
whose tokens skip an expert still takes part in every collective: no leaf modules are needed (measured: bench/moe.py,
docs/moe.md). What transformers leaves to its own `labels` path - the auxiliary loss - zerotrain adds here, since
its tasks compute their own losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from trainer.config import ConfigError


@dataclass(frozen=True)
class Routing:
    """How a mixture-of-experts model routes its tokens."""

    experts: int  # routed experts per MoE layer
    top_k: int  # experts each token uses
    aux_loss_coef: float  # weight of the load-balancing loss in the training loss (router_aux_loss_coef)


def routing(config: PretrainedConfig) -> Routing | None:
    """The model's routing; None for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        return None
    return Routing(experts, config.num_experts_per_tok, getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def check_routing(config: PretrainedConfig, where: str) -> None:
    """Pre-flight: routing transformers builds but cannot run (`where`: the key that set the config)."""
    moe = routing(config)
    if moe is not None and not 1 <= moe.top_k <= moe.experts:
        raise ConfigError(f"{where}.num_experts_per_tok: each token cannot use {moe.top_k} of the model's "
                          f"{moe.experts} experts; give 1 to {moe.experts}")


class Router:
    """The router's load-balancing loss and the experts' load, taken from each training forward's output (the
    model returns its routers' logits and transformers' auxiliary loss when config.output_router_logits is on).
    `penalty()` is what the step adds to the task's loss; `metrics()` the logged means since the last log."""

    def __init__(self, model: torch.nn.Module, moe: Routing, device: torch.device):
        model.config.output_router_logits = True  # the trained module only: an export's config keeps its own
        self.moe, self.device = moe, device
        self.aux = None  # the last training forward's auxiliary loss, with its graph
        self.aux_sum, self.micro_batches = torch.zeros((), device=device), 0
        self.load = None  # tokens routed to each expert of each MoE layer since the last log
        model.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, _inputs, output) -> None:
        # validation's forwards neither train nor count; a head without the routers' outputs (a classifier) gives none
        if not module.training or getattr(output, "aux_loss", None) is None:
            return
        self.aux = output.aux_loss
        if self.load is None:
            self.load = torch.zeros(len(output.router_logits), self.moe.experts, device=self.device)
        self.aux_sum += self.aux.detach().float()
        self.micro_batches += 1
        with torch.no_grad():
            for layer, logits in enumerate(output.router_logits):
                # top-k of the logits is top-k of the softmax the router takes: the experts the tokens went to
                chosen = logits.topk(self.moe.top_k, dim=-1).indices.flatten()
                self.load[layer] += torch.bincount(chosen, minlength=self.moe.experts)

    def penalty(self) -> torch.Tensor | float:
        """router_aux_loss_coef x the auxiliary loss of the forward that just ran, as transformers' own loss
        adds it."""
        aux, self.aux = self.aux, None
        return 0.0 if aux is None or not self.moe.aux_loss_coef else self.moe.aux_loss_coef * aux

    def metrics(self) -> dict[str, float]:
        """Over every rank, since the last call (a collective): the mean auxiliary loss, and per MoE layer the
        busiest expert's tokens over the mean (1 is perfect balance; experts / top_k is one expert for all).
        transformers' Mixtral and Qwen3-MoE drop no tokens: every token reaches its experts."""
        if self.load is None:  # the model returns no router logits (the same on every rank)
            return {}
        packed = torch.cat([torch.stack([self.aux_sum, torch.tensor(float(self.micro_batches), device=self.device)]),
                            self.load.flatten()])
        dist.all_reduce(packed)
        aux, load = packed[0] / packed[1].clamp(min=1), packed[2:].view_as(self.load)
        self.aux_sum.zero_()
        self.micro_batches = 0
        self.load.zero_()
        balance = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
        return {"train/router_aux_loss": aux.item(),
                **{f"moe/layer{layer}/load_max_mean": value for layer, value in enumerate(balance)}}

