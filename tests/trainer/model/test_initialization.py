"""Initial weights (trainer/model/initialization.py): the same built whole or partitioned, on any ranks."""

from __future__ import annotations

import pytest
import torch

from ranks import join, spawn, write_result


def _built(rank: int, world: int, port: int, out: str) -> None:
    """Each model type built whole and built partitioned (deepspeed.zero.Init over `world` ranks): equal?"""
    join(rank, world, port)
    import deepspeed
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig

    from trainer.model.initialization import initialise

    configs = {"llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=512),
               "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=64)}
    result = {}
    for kind, config in configs.items():
        torch.manual_seed(kind == "gpt2")  # the global RNG's state does not matter
        whole, other_seed = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
        initialise(whole, 7)
        initialise(other_seed, 8)
        zero_init = HfDeepSpeedConfig({"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
                                       "zero_optimization": {"stage": 3}})
        partitioned = AutoModelForCausalLM.from_config(config)
        initialise(partitioned, 7, gather=deepspeed.zero.GatheredParameters)
        del zero_init
        same, differs = [], []
        for (name, a), (_, b), (_, c) in zip(whole.named_parameters(), other_seed.named_parameters(),
                                             partitioned.named_parameters()):
            with deepspeed.zero.GatheredParameters([c]):
                same.append(torch.equal(a, c.data))
            differs.append(a.std() == 0 or not torch.equal(a, b))  # norms start at ones whatever the seed
        result[kind] = {"same": all(same), "seed_matters": all(differs)}
    write_result(out, rank, result)


@pytest.mark.slow
def test_the_initial_weights_do_not_depend_on_partitioned_building_or_ranks():
    """What makes every ZeRO stage train the same losses from one seed (test_train.py, stage 3 built
    partitioned); GPT-2 too, whose _init_weights redraws its children (scaled residual projections)."""
    for result in spawn(_built, 2):
        assert result == {"llama": {"same": True, "seed_matters": True}, "gpt2": {"same": True, "seed_matters": True}}
