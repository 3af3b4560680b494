"""LoRA (model.lora, trainer/model/lora.py): adapters on a frozen base trained at ZeRO 3 on 2 ranks, checkpoints
without the base, resume on 1 rank, both exports giving the engine's validation loss, and the
settings refused before any rank starts.

The base is a 2-layer Llama of hidden size 512 and MLP width 1024 with adapters of rank 128: its MLP adapters
(1024 x 128) exceed DeepSpeed's stage-3 persistence threshold (zerotrain: 1e5 elements), so ZeRO 3 partitions
them - a rank-0 save of the live module would write them with shape (0,)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers import (STEPS, as_of_step_6, engine_validation_loss, export_validation_loss, refused, resumed_like,
                     tiny_args, train_losses, zerotrain)
from launcher.models import load_export
from trainer.config import load_config
from trainer.engine.deepspeed_config import deepspeed_config

pytestmark = pytest.mark.slow
RANK = 128
LORA = [f"model.lora.rank={RANK}", "model.lora.alpha=256", "model.config={}", "zero.stage=3", "optim.lr=1e-3"]


@pytest.fixture(scope="session")
def lora_base(tiny_data, tmp_path_factory) -> Path:
    """A model of the tiny data's vocabulary, large enough that ZeRO 3 partitions its adapters; its output layer is
    its input embedding (tied: a frozen parameter of two names)."""
    folder = tmp_path_factory.mktemp("lora-base") / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def lora_args(run_dir: Path, tiny_data: Path, base: Path, *overrides: str) -> list[str]:
    return tiny_args(run_dir, tiny_data, f"model.init_from={base}", *LORA, *overrides)


@pytest.fixture(scope="session")
def lora_run(lora_base, tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    zerotrain("train", *lora_args(run_dir, tiny_data, lora_base))
    return run_dir


def test_adapters_exceed_the_persistence_threshold(lora_run):
    """Otherwise the export test below would prove nothing: ZeRO 3 would keep every adapter whole on each rank."""
    cfg = load_config(lora_run / "config.yaml")
    threshold = deepspeed_config(cfg, 5_000_000)["zero_optimization"]["stage3_param_persistence_threshold"]
    assert 1024 * RANK > threshold


def test_checkpoints_hold_the_adapters_not_the_base(lora_run, lora_base):
    """Only the adapters are trained and saved: fp32 master weights and Adam moments of their 2.2M elements (12 B
    each), none of the base's 5.3M weights."""
    ckpt = lora_run / "checkpoints" / f"step_{STEPS:08d}"
    states = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    names = [name for group in states["param_shapes"] for name in group]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert sorted(states["module"]) == sorted(names)  # no frozen weight under any of its names
    adapters = sum(torch.Size(shape).numel() for group in states["param_shapes"] for shape in group.values())
    base = AutoModelForCausalLM.from_pretrained(lora_base).num_parameters()
    saved = sum(f.stat().st_size for f in ckpt.iterdir())
    assert adapters < 0.5 * base and 12 * adapters < saved < 12 * adapters * 1.1
    logged = (lora_run / "logs" / "rank0.log").read_text()
    assert "M trained: LoRA rank 128" in logged


def test_both_exports_give_the_engines_validation_loss(lora_run, lora_base, tmp_path):
    zerotrain("export", lora_run, tmp_path / "adapter")
    zerotrain("export", lora_run, tmp_path / "merged", "--merge")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(t.numel() > 0 for t in adapter.values())  # A and B, 7 layers x 2
    assert max(t.numel() for t in adapter.values()) == 1024 * RANK
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(lora_base)
    engine = engine_validation_loss(lora_run)
    assert export_validation_loss(lora_run, tmp_path / "merged") == pytest.approx(engine, abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(lora_base)
    assert abs(export_validation_loss(lora_run, base) - engine) > 1e-2  # the adapters are what makes them equal
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert export_validation_loss(lora_run, peft) == pytest.approx(engine, abs=1e-5)
    assert export_validation_loss(lora_run, load_export(tmp_path / "adapter", AutoModelForCausalLM)) == \
        pytest.approx(engine, abs=1e-5)  # what generate, chat and predict load
    assert zerotrain("generate", tmp_path / "adapter", "--prompt", "ROMEO:", "--max-new-tokens", "5").stdout


def test_a_lora_run_resumes_on_one_rank(lora_run, lora_base, tiny_data, tmp_path):
    """Through DeepSpeed's universal conversion of a checkpoint without the frozen base. (Bit for bit on the same
    ranks: the LoRA classifier of tests/trainer/tasks/test_classification.py.)"""
    run = as_of_step_6(lora_run, tmp_path / "run")
    zerotrain("train", *lora_args(run, tiny_data, lora_base, "launch.nproc_per_node=1"), "--resume", "auto")
    assert resumed_like(run, lora_run, 1e-5), (train_losses(run), train_losses(lora_run))


def test_resuming_on_another_base_or_without_adapters_is_refused(lora_run, lora_base, tiny_data, tmp_path):
    run = as_of_step_6(lora_run, tmp_path / "run")
    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(lora_base)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(other)
    message = refused("train", *lora_args(run, tiny_data, other), "--resume", "auto").stderr
    assert "model.init_from" in message and "is not the base model" in message
    message = refused("train", *tiny_args(run, tiny_data, f"model.init_from={lora_base}", "model.config={}",
                                          "zero.stage=3", "optim.lr=1e-3"), "--resume", "auto").stderr
    assert "model.lora: checkpoint step_00000006 was trained with LoRA adapters" in message


@pytest.mark.parametrize("setting, says", [
    ("model.lora.target_modules=[qkv]", "model.lora.target_modules: ['qkv'] match no layer of the model; its "
                                        "linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"),
    ("model.lora.rank=600", "model.lora.rank: 600 exceeds the smaller side of layer model.layers.0.self_attn.q_proj "
                            "(512 -> 512); at most 512"),
    ("model.lora.rank=0", "model.lora.rank: input should be greater than or equal to 1 (got 0)"),
    ("model.lora.target_modules=[act_fn]", "model.lora: PEFT cannot add adapters to this llama model (Target module "
                                           "SiLUActivation() is not supported."),
    ("parallel.tensor=2", "parallel.tensor: DeepSpeed 0.19.8's AutoTP does not compose with LoRA adapters"),
    ("model.lora.quantize=4bit", "model.lora.quantize: 4-bit bases need a CUDA GPU: bitsandbytes' CPU kernels train "
                                 "but do not resume exactly"),
])
def test_bad_adapter_settings_are_refused_in_one_line(setting, says, lora_base, tiny_data, tmp_path):
    message = refused("train", *lora_args(tmp_path / "run", tiny_data, lora_base, setting)).stderr
    assert says in message and len(message.strip().splitlines()) == 1, message


def test_merging_a_run_without_adapters_is_refused(tiny_run, tmp_path):
    message = refused("export", tiny_run, tmp_path / "out", "--merge").stderr
    assert "--merge:" in message and "no model.lora" in message
