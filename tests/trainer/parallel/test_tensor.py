"""parallel.tensor (DeepSpeed AutoTP): 2 ranks holding half of every linear layer train the losses of data
parallelism with the same global batch at ZeRO 0-2; checkpoints resume at another tensor degree and export to
the same Hugging Face model; what cannot work is refused in one line."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from helpers import STEPS, TINY, as_of_step_6, read_metrics, refused, resumed_like, tiny_args, train_losses, zerotrain
from live_tensors import split_activations
from trainer.config import ConfigError, load_config
from trainer.model.shape import check_tensor_split

# fp32; the row-parallel layers sum their halves in another order than one matmul does (measured: 1e-6)
TOLERANCE = 1e-5


def val_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}


def tensor_parallel(prepared, run_dir, stage: int):
    zerotrain("train", *tiny_args(run_dir, prepared, "parallel.tensor=2", f"zero.stage={stage}"))
    return run_dir


@pytest.fixture(scope="module")
def tp_run(tiny_data, tmp_path_factory):
    """Tensor parallel over 2 ranks at ZeRO 1: saved at steps 6 and 12."""
    return tensor_parallel(tiny_data, tmp_path_factory.mktemp("tp") / "split", stage=1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_weights_split_over_two_ranks_train_the_losses_of_data_parallelism(stage, tp_run, tiny_run, tiny_data,
                                                                          tmp_path):
    """tiny_run: 2 data-parallel ranks at ZeRO 2 (every stage trains its losses: test_train.py)."""
    split = tp_run if stage == 1 else tensor_parallel(tiny_data, tmp_path / "split", stage)
    expected, got = train_losses(tiny_run), train_losses(split)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], abs=TOLERANCE)
    assert val_losses(split) and val_losses(split) == pytest.approx(val_losses(tiny_run), abs=TOLERANCE)
    if stage == 0:  # its optimizer state lives in the sliced model files: only the same degree loads it
        moved = tmp_path / "moved"
        shutil.copytree(split, moved)
        said = refused("train", *tiny_args(moved, tiny_data, "zero.stage=0", "train.max_steps=14"), "--resume",
                       "auto").stderr
        assert "parallel.tensor: checkpoint step_00000012 was saved at ZeRO stage 0 with parallel.tensor 2" in said
        exported = zerotrain("export", split, tmp_path / "export", check=False)
        assert exported.returncode != 0 and "a ZeRO-0 checkpoint of a tensor- or expert-parallel run" in exported.stderr
        assert not (tmp_path / "export").exists()


def resumed_from_step_6(run_dir, tmp_path, prepared, ranks: int, *settings: str):
    resumed = as_of_step_6(run_dir, tmp_path / "resumed")
    result = zerotrain("train", *tiny_args(resumed, prepared, *settings), "--nproc", str(ranks), "--resume", "auto")
    return resumed, result


@pytest.mark.slow
@pytest.mark.parametrize("ranks,tensor", [(2, 2), (2, 1), (1, 1)])
def test_a_tensor_parallel_run_resumes_at_another_degree(ranks, tensor, tp_run, tiny_data, tmp_path):
    """Saved by a tensor group of 2; resumed by the same (its own files), by 2 data-parallel ranks and by 1 rank
    (DeepSpeed's universal conversion joins the slices), exactly where it stood."""
    resumed, result = resumed_from_step_6(tp_run, tmp_path, tiny_data, ranks, "zero.stage=1",
                                          f"parallel.tensor={tensor}")
    assert ("universal checkpoint" in result.stdout) == (tensor == 1)
    assert resumed_like(resumed, tp_run, TOLERANCE)


@pytest.mark.slow
def test_a_data_parallel_run_resumes_tensor_parallel(tiny_run, tiny_data, tmp_path):
    resumed, result = resumed_from_step_6(tiny_run, tmp_path, tiny_data, 2, "parallel.tensor=2")
    assert "universal checkpoint" in result.stdout
    assert resumed_like(resumed, tiny_run, TOLERANCE)


@pytest.mark.slow
def test_a_tensor_parallel_run_exports_the_whole_model(tp_run, tiny_run, tiny_data, tmp_path):
    """The slices joined: the Hugging Face model of the data-parallel run, up to training's rounding."""
    zerotrain("export", tp_run, tmp_path / "split")
    zerotrain("export", tiny_run, tmp_path / "whole")
    assert not list((tp_run / "checkpoints").glob("*.export-*"))  # the conversion it made is gone
    ids = torch.arange(1, 20).unsqueeze(0)
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / e)(input_ids=ids).logits for e in ("split", "whole")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    # ... and a tensor-parallel run starts from it (model.init_from): from the trained weights, not fresh ones
    again = tmp_path / "again"
    zerotrain("train", *tiny_args(again, tiny_data, f"model.init_from={tmp_path / 'split'}", "model.config={}",
                                  "parallel.tensor=2", "zero.stage=1", "train.max_steps=2", "checkpoint.every=0"))
    assert train_losses(again)[1] < train_losses(tiny_run)[1] - 0.3  # fresh weights start at tiny_run's step 1


@pytest.mark.slow
def test_the_plan_counts_a_ranks_slice_of_the_model_and_its_activations():
    """Within 15% (like the stage estimates): what rank 0 of a tensor group of 2 holds and keeps for backward
    against trainer/memory.py."""
    kept = split_activations(TINY, ["model.config.max_position_embeddings=1024", "zero.stage=1"], 2, False, 512,
                             split="tensor")
    print(f"tensor split over 2 ranks: activations measured / estimated {kept['measured'] / kept['estimated']:.3f}, "
          f"parameters {kept['params_measured'] / kept['params_estimated']:.3f}")
    assert abs(kept["measured"] / kept["estimated"] - 1) <= 0.15, kept
    assert kept["params_measured"] == kept["params_estimated"]


def test_models_that_cannot_be_split_are_refused():
    check_tensor_split(LlamaConfig(num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                                   vocab_size=512), 4)
    with pytest.raises(ConfigError, match="parallel.tensor: 4 does not divide the model's key/value heads \\(2\\)"):
        check_tensor_split(LlamaConfig(num_attention_heads=8, num_key_value_heads=2, vocab_size=512), 4)
    with pytest.raises(ConfigError, match="parallel.tensor: 2 does not divide the model's vocabulary \\(511\\)"):
        check_tensor_split(LlamaConfig(vocab_size=511), 2)
    with pytest.raises(ConfigError, match="parallel.tensor: transformers has no tensor-parallel plan for gpt2"):
        check_tensor_split(GPT2Config(), 2)
    with pytest.raises(ConfigError, match="parallel.tensor: splits decoder language models"):
        load_config(TINY.parent / "finetune_sentiment.yaml", ["parallel.tensor=2"])
