"""The fp32 master weights of every checkpoint (trainer/engine/weights.py), over the matrix users run: precision
(fp32, bf16) x ZeRO stage (0-3). Every run's export computes the validation loss
the engine logged for it, on the same held-out samples; every bf16 run resumes on another number of ranks to its
own losses; a bf16 export starts a new run where it ended. The bf16 runs tie their embeddings (the output layer
is the input embedding). fp32 runs resume on other ranks in checkpointing/test_resume.py, and start from an
export in test_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from helpers import (STEPS, as_of_step_6, engine_validation_loss, export_validation_loss, resumed_like, tiny_args,
                     train_losses, zerotrain)

pytestmark = pytest.mark.slow
BF16 = ["train.precision=bf16", "model.config.tie_word_embeddings=true"]


@pytest.fixture(scope="session")
def bf16_run(tiny_data, tmp_path_factory):
    """configs/tiny.yaml in bf16 with tied embeddings at a ZeRO stage, trained once per session on first use."""
    runs = {}

    def trained(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp("bf16") / f"stage{stage}"
            zerotrain("train", *tiny_args(runs[stage], tiny_data, *BF16, f"zero.stage={stage}"))
        return runs[stage]
    return trained


@pytest.mark.parametrize("stage", [0, 1, 3])  # stage 2: test_train.py compares the export with the live weights
def test_an_fp32_export_is_the_engines_model(stage, stage_run, tmp_path):
    run = stage_run(stage)
    zerotrain("export", run, tmp_path / "export")
    assert export_validation_loss(run, tmp_path / "export") == pytest.approx(engine_validation_loss(run), abs=1e-5)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_bf16_run_exports_its_model_and_resumes_on_another_number_of_ranks(stage, bf16_run, tiny_data, tmp_path):
    run = bf16_run(stage)
    # ZeRO 1 sums bf16 gradients in fp32 with DeepSpeed's BF16_Optimizer, whose files only the universal
    # conversion reads
    if stage == 1:
        assert list((run / "checkpoints" / "step_00000012").glob("bf16_zero_pp_rank_*"))
    zerotrain("export", run, tmp_path / "export")
    # the export holds the fp32 master weights; the engine validated with their bf16 copy
    assert export_validation_loss(run, tmp_path / "export") == pytest.approx(engine_validation_loss(run), abs=2e-2)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.lm_head.weight is exported.get_input_embeddings().weight
    resumed = as_of_step_6(run, tmp_path / "resumed")
    result = zerotrain("train", *tiny_args(resumed, tiny_data, *BF16, f"zero.stage={stage}"), "--nproc", "1",
                       "--resume", "auto")
    assert ("universal checkpoint" in result.stdout) == (stage > 0)  # stage 0 saves the optimizer whole
    assert resumed_like(resumed, run, 1e-2)  # 1 rank against 2: bf16 forwards of another batch split


def test_a_bf16_export_starts_a_new_run_where_it_ended(bf16_run, tiny_data, tmp_path):
    """A ZeRO-3 export with tied embeddings, loaded into a new ZeRO-3 run built partitioned (zero.Init)."""
    run = bf16_run(3)
    zerotrain("export", run, tmp_path / "export")
    continued = tmp_path / "continued"
    zerotrain("train", *tiny_args(continued, tiny_data, "train.precision=bf16", "zero.stage=3",
                                  f"model.init_from={tmp_path / 'export'}", "model.config={}", "train.max_steps=1",
                                  "optim.warmup_steps=0", "eval.every=0"))
    assert train_losses(continued)[1] == pytest.approx(train_losses(run)[STEPS], abs=0.1)
    assert train_losses(continued)[1] < train_losses(run)[1] - 0.3  # not a fresh model
