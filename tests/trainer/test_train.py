"""Real runs: prepare -> 2 DeepSpeed ranks over gloo -> metrics, every ZeRO stage, mixtures -> export, on Shakespeare."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline import Manifest
from helpers import STEPS, diverging, read_metrics, refused, tiny_args, train_losses, zerotrain
from trainer.config import load_config
from trainer.model.build import build_model, model_config

pytestmark = pytest.mark.slow


def test_loss_falls_and_metrics_are_well_formed(tiny_run):
    records = read_metrics(tiny_run)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "train/tokens_seen"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
    assert train[-1]["train/tokens_seen"] == STEPS * 16 * 32  # global batch x seq_len per step
    for r in train[1:]:  # step 1 includes start-up
        assert 0 < r["perf/mfu"] <= 1 and r["mem/rss_gib"] > 0.1, r
        assert r["perf/tokens_per_s_per_rank"] == pytest.approx(r["perf/tokens_per_s"] / 2)
        # 6 x (147,776 weights - 32,768 of the input embedding, a lookup) + attention 12 x layers x hidden x seq
        assert r["perf/model_tflops_per_rank"] * 1e12 == pytest.approx(
            r["perf/tokens_per_s_per_rank"] * (6 * 115_008 + 12 * 2 * 64 * 32), rel=1e-6)
        phases = sum(r[f"perf/{p}_s"] for p in ("data", "forward", "backward", "optimizer"))
        assert 0.5 * r["perf/step_s"] < phases <= r["perf/step_s"], r  # the loop's own work is the rest
        assert r["train/loss_spikes"] == r["train/nonfinite_steps"] == r["train/skipped_steps"] == 0
    losses = [r["train/loss"] for r in train]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [6, 12]
    assert val[1]["val/loss"] < val[0]["val/loss"]
    assert val[1]["val/ppl"] == pytest.approx(math.exp(val[1]["val/loss"]))
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["final_loss"] == losses[-1] and summary["val_loss"] == val[1]["val/loss"]


def test_run_directory_layout(tiny_run):
    assert load_config(tiny_run / "config.yaml").run_dir == tiny_run
    checkpoints = tiny_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000012"
    for tag in ("step_00000006", "step_00000012"):
        files = {p.name for p in (checkpoints / tag).iterdir()}
        assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt", "train_state.json", "config.yaml"} <= files
    state = json.loads((checkpoints / "step_00000006" / "train_state.json").read_text())
    assert (state["step"], state["consumed_samples"]) == (6, 6 * 16)
    assert {"rank0.log", "rank1.log"} <= {p.name for p in (tiny_run / "logs").iterdir()}
    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_s", "val/loss"} <= set(events.Tags()["scalars"])
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optim.lr"].number_value == 3e-3  # the HPARAMS tab's columns


def test_export_loads_in_transformers_with_the_trained_logits(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "export"
    zerotrain("export", tiny_run, out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The engine's live module weights at the last save, as DeepSpeed wrote them.
    live = torch.load(tiny_run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt",
                      weights_only=False)["module"]
    section = load_config(tiny_run / "config.yaml").model
    reference = build_model(section, model_config(section, Manifest.load(tiny_data).vocab_size), AutoModelForCausalLM)
    reference.load_state_dict(live)
    inputs = tokenizer("To be, or not to be, that is the question", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference.eval()(**inputs).logits)
    assert tokenizer.decode(inputs["input_ids"][0]) == "To be, or not to be, that is the question"
    again = zerotrain("export", tiny_run, out, check=False)
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr


@pytest.mark.parametrize("stage,checkpointing", [(0, False), (1, False), (3, False), (2, True), (3, True)])
def test_every_zero_stage_trains_like_stage_2(stage, checkpointing, stage_run, tiny_run, tiny_data, tmp_path):
    """Same seed and data: the same losses at every stage, with activation checkpointing or without; stage 3
    builds the model partitioned (deepspeed.zero.Init) from the same initial weights."""
    run_dir = tmp_path / f"stage{stage}"
    if checkpointing:
        zerotrain("train", *tiny_args(run_dir, tiny_data, f"zero.stage={stage}", "model.gradient_checkpointing=true"))
    else:
        run_dir = stage_run(stage)
    expected, got = train_losses(tiny_run), train_losses(run_dir)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if stage == 3 and not checkpointing:  # per-rank parameter shards consolidate to the same model
        zerotrain("export", run_dir, tmp_path / "export3")
        zerotrain("export", tiny_run, tmp_path / "export2")
        ids = torch.arange(1, 20).unsqueeze(0)
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / e)(input_ids=ids).logits for e in ("export3", "export2")]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_a_loss_that_goes_nan_stops_the_run_without_saving_it(tiny_data, tmp_path):
    run_dir = tmp_path / "diverged"  # 2 micro-batches a step, no validation: NaN from step 3 on
    result = zerotrain("train", *tiny_args(run_dir, tiny_data, "zero.stage=0", "checkpoint.every=1", "eval.every=0",
                                           "train.max_nonfinite_steps=2"), check=False, env=diverging(after=4))
    assert result.returncode == 1
    assert "rank 0 failed (exit code 1): NonFiniteLoss: the loss was NaN or infinite for 2 step(s)" in result.stderr
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    nan_steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r and math.isnan(r["train/loss"])]
    assert saved == ["step_00000001", "step_00000002"] and nan_steps[0] == 3  # none of the NaN steps saved


def test_weighted_mixture_logs_realised_shares_and_per_source_validation(mixture_data, tmp_path):
    sources, prepared = mixture_data
    run_dir = tmp_path / "mix"
    zerotrain("train", *tiny_args(run_dir, prepared, f"data.sources={sources}"))
    records = read_metrics(run_dir)
    last = [r for r in records if "train/loss" in r][-1]
    assert last["data/early_fraction"] + last["data/late_fraction"] == pytest.approx(1)
    assert last["data/early_fraction"] == pytest.approx(0.75, abs=0.1)  # 192 samples drawn at 3:1
    val = [r for r in records if "val/loss" in r][-1]
    assert {"val/early/loss", "val/late/loss"} <= set(val)
    assert min(val["val/early/loss"], val["val/late/loss"]) <= val["val/loss"] <= max(val["val/early/loss"], val["val/late/loss"])


def test_training_starts_from_an_export(tiny_run, tiny_data, tmp_path):
    zerotrain("export", tiny_run, tmp_path / "export")
    run_dir = tmp_path / "continued"
    zerotrain("train", *tiny_args(run_dir, tiny_data, f"model.init_from={tmp_path / 'export'}", "model.config={}",
                                  "train.max_steps=2", "eval.every=0"))
    from_scratch, continued = train_losses(tiny_run), train_losses(run_dir)
    assert continued[1] < from_scratch[1] - 0.4  # it starts where the exported model ended, not at random
    assert continued[1] == pytest.approx(from_scratch[STEPS], abs=0.2)
    wrong = refused("train", *tiny_args(tmp_path / "r2", tiny_data, "model.init_from=/nonexistent",
                                        "model.config={}"))
    assert "model.init_from: /nonexistent is not a Hugging Face model folder" in wrong.stderr

