"""Mixture-of-experts models (trainer/model/moe.py): a tiny Mixtral and a tiny Qwen3-MoE (4 experts, top-2, 2
layers) pretrained on Shakespeare on 2 gloo ranks - the same losses at every ZeRO stage and with expert
parallelism (DeepSpeed's AutoEP), the router's load-balancing loss as transformers defines it, expert load and
active-parameter FLOPs logged, resume on another expert degree, exports with the trained logits, LoRA of an MoE
export, and the settings refused before any rank starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import (STEPS, as_of_step_6, engine_validation_loss, export_validation_loss, read_metrics, refused,
                     resumed_like, tiny_args, train_losses, zerotrain)
from trainer.engine.repairs import output_recorders_by_class_name
from trainer.model.moe import Router, routing
from trainer.observe.report import panels
from trainer.tasks.causal_lm import lm_loss

pytestmark = pytest.mark.slow
MODELS = {
    "mixtral": ["model.type=mixtral", "model.config.num_local_experts=4", "model.config.router_aux_loss_coef=0.02"],
    "qwen3_moe": ["model.type=qwen3_moe", "model.config.num_experts=4", "model.config.num_experts_per_tok=2",
                  "model.config.moe_intermediate_size=64",
                  "model.config.router_aux_loss_coef=0.02"],
}
# fp32; expert parallelism sums each token's experts in another order (measured: within 1e-6)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def moe_run(tiny_data, tmp_path_factory):
    """A tiny MoE trained uninterrupted (configs/tiny.yaml's 12 steps, 2 ranks), once per module on first use:
    `moe_run("mixtral", stage, expert)`."""
    runs = {}

    def trained(model: str, stage: int, expert: int = 1) -> Path:
        key = (model, stage, expert)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("moe") / f"{model}-z{stage}-ep{expert}"
            zerotrain("train", *tiny_args(runs[key], tiny_data, *MODELS[model], f"zero.stage={stage}",
                                          f"parallel.expert={expert}"))
        return runs[key]
    return trained


def test_router_loss_is_transformers_own():
    """What a step trains on: the task's loss plus router_aux_loss_coef x transformers' auxiliary loss, exactly
    the loss transformers computes itself when given labels."""
    config = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=512,
                                  num_local_experts=4, router_aux_loss_coef=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    router = Router(model, routing(config), torch.device("cpu"))
    batch = torch.randint(0, 512, (2, 17))
    ours = lm_loss(model, batch) + router.penalty()
    assert router.penalty() == 0.0  # taken once per forward
    theirs = model(input_ids=batch[:, :-1], labels=batch[:, :-1], shift_labels=batch[:, 1:].contiguous()).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    # both forwards counted: each of the 2 x 16 tokens went to 2 experts in each layer
    assert router.micro_batches == 2 and router.load.sum(dim=1).tolist() == [2 * 32 * 2] * 2


def test_the_output_recorder_repair_is_still_needed():
    """AutoEP's call on transformers' registry of output recorders fails without the repair: when it no longer
    does, repairs.output_recorders_by_class_name can go. With it, a class name and a model both look up."""
    from transformers.utils.output_capturing import _CanRecordRegistry

    registry = _CanRecordRegistry()
    original = getattr(_CanRecordRegistry.get, "original", _CanRecordRegistry.get)
    with pytest.raises(TypeError):
        original(registry, "<class 'Mixtral'>", None)
    output_recorders_by_class_name()
    model = torch.nn.Linear(1, 1)
    registry[model] = {"router_logits": "recorder"}
    assert registry.get(str(torch.nn.Linear), None) == registry.get(model) == {"router_logits": "recorder"}
    assert registry.get("<class 'Mixtral'>", "missing") == "missing"


def test_router_loss_expert_load_and_active_flops_are_logged(moe_run):
    records = read_metrics(moe_run("mixtral", 2))
    train = [r for r in records if "train/loss" in r]
    assert len(train) == STEPS
    for r in train:
        assert 1 < r["train/router_aux_loss"] < 4, r  # 2 (top-2) when balanced
        for layer in (0, 1):  # the busiest expert's tokens over the mean: 1 (balanced) to 4 / 2 (all on one)
            assert 1 <= r[f"moe/layer{layer}/load_max_mean"] <= 2, r
    # 6 x the weights a token multiplies: 295,744 - the input embedding (32,768) - the two experts of four it
    # skips in each layer (2 x 49,152); plus attention 12 x layers x hidden x seq_len
    for r in train[1:]:
        assert r["perf/model_tflops_per_rank"] * 1e12 == pytest.approx(
            r["perf/tokens_per_s_per_rank"] * (6 * 164_672 + 12 * 2 * 64 * 32), rel=1e-6)
    assert {"router loss", "expert load"} <= set(panels(records))


@pytest.mark.parametrize("model,stage", [("mixtral", 0), ("mixtral", 3), ("qwen3_moe", 3)])
def test_every_zero_stage_trains_like_stage_2(model, stage, moe_run):
    """Stage 3 partitions every layer's experts (one 3-D weight each) like any weight: no leaf modules needed.
    (Stage 1: with expert parallelism below.)"""
    expected, got = train_losses(moe_run(model, 2)), train_losses(moe_run(model, stage))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("stage,baseline", [(1, 2), (3, 3)])
def test_expert_parallelism_trains_like_every_rank_holding_every_expert(stage, baseline, moe_run):
    """At ZeRO 1 against ZeRO 2 without expert parallelism (stages 1 and 2 train alike, as every dense test and
    the stage-3 run here show); at ZeRO 3 against ZeRO 3."""
    expected, got = train_losses(moe_run("mixtral", baseline)), train_losses(moe_run("mixtral", stage, expert=2))
    assert got == pytest.approx(expected, abs=TOLERANCE)


def test_an_expert_parallel_run_exports_the_model_it_trained(moe_run, tmp_path):
    """AutoEP's weights (each rank 2 of the 4 experts, gate and up projections apart, under its own names) become
    transformers' Mixtral again: the same logits as the export of the same training without expert parallelism."""
    ids = torch.arange(1, 30).unsqueeze(0)
    logits = []
    for name, run in (("ep", moe_run("mixtral", 3, expert=2)), ("plain", moe_run("mixtral", 3))):
        zerotrain("export", run, tmp_path / name)
        logits.append(AutoModelForCausalLM.from_pretrained(tmp_path / name)(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_resume_on_other_ranks_and_expert_degree(moe_run, tiny_data, tmp_path):
    """2 ranks holding 2 experts each, resumed on 4 ranks holding 1 each: DeepSpeed's universal conversion of
    AutoEP's experts. The load-balancing loss is a micro-batch's: 4 ranks of 2 samples balance other groups of
    tokens than 2 ranks of 4 (measured: losses within 1.2e-5)."""
    uninterrupted = moe_run("mixtral", 3, expert=2)
    copy = as_of_step_6(uninterrupted, tmp_path / "resumed")
    zerotrain("train", *tiny_args(copy, tiny_data, *MODELS["mixtral"], "zero.stage=3", "parallel.expert=4",
                                  "launch.nproc_per_node=4", "train.micro_batch_size=2"), "--resume", "auto")
    assert resumed_like(copy, uninterrupted, 5e-5)


def test_lora_of_an_moe_export(moe_run, tiny_data, tmp_path):
    """init_from an MoE export, adapters on attention, router and experts (PEFT's all-linear, its 3-D expert
    weights through target_parameters) at ZeRO 3; the merged export gives the engine's validation loss."""
    zerotrain("export", moe_run("mixtral", 2), tmp_path / "base")
    run = tmp_path / "lora"
    zerotrain("train", *tiny_args(run, tiny_data, f"model.init_from={tmp_path / 'base'}", "model.config={}",
                                  "model.lora.rank=4", "zero.stage=3", "train.max_steps=6"))
    losses = train_losses(run)
    assert losses[6] < losses[1]
    zerotrain("export", run, tmp_path / "merged", "--merge")
    assert export_validation_loss(run, tmp_path / "merged") == pytest.approx(engine_validation_loss(run), abs=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.expert=2", "model.config.num_local_experts=3"], "parallel.expert: 2 does not divide the model's 3"),
    (["parallel.expert=4"], "parallel.expert: 4 does not divide the world size (2)"),
    (["model.config.num_experts_per_tok=5"], "model.config.num_experts_per_tok: each token cannot use 5 of"),
    (["parallel.expert=2", "parallel.sequence=2"], "parallel.expert: does not compose with parallel.sequence"),
    (["parallel.expert=2", "model.lora.rank=2"], "parallel.expert: LoRA adapters are trained without"),
])
def test_bad_mixture_of_experts_settings_are_refused(overrides, message, tiny_data, tmp_path):
    result = refused("train", *tiny_args(tmp_path / "run", tiny_data, *MODELS["mixtral"], *overrides))
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("overrides,message", [
    (["parallel.expert=2"], "parallel.expert: model type llama is dense"),
    (["model.config.router_aux_loss_coef=0.01"], "model.config.router_aux_loss_coef: llama models have no router"),
    (["parallel.expert=2", "model.type=olmoe", "model.config.num_experts=4", "model.config.num_experts_per_tok=2"],
     "parallel.expert: DeepSpeed 0.19.8's AutoEP has no preset for model type olmoe"),
])
def test_expert_settings_on_models_without_them_are_refused(overrides, message, tiny_data, tmp_path):
    result = refused("train", *tiny_args(tmp_path / "run", tiny_data, *overrides))
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_expert_parallelism_cannot_be_switched_on_resume(moe_run, tiny_data, tmp_path):
    copy = as_of_step_6(moe_run("mixtral", 3, expert=2), tmp_path / "resumed")
    result = refused("train", *tiny_args(copy, tiny_data, *MODELS["mixtral"], "zero.stage=3"), "--resume", "auto")
    assert "parallel.expert: checkpoint step_00000006 was trained with parallel.expert 2" in result.stderr
