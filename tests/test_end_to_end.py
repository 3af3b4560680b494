"""Real runs: prepare -> 2 DeepSpeed ranks over gloo -> checkpoints -> resume -> export, on Shakespeare."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, TINY as TINY_CONFIG, tiny_args, zerotrain
from data_pipeline import Manifest
from trainer.config import load_config
from trainer.model import build_model

pytestmark = pytest.mark.slow
STEPS = 12  # configs/tiny.yaml: max_steps 12, checkpoint and validation every 6, log every step


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    zerotrain("train", *tiny_args(run_dir, tiny_data))
    return run_dir


def test_loss_falls_and_metrics_are_well_formed(tiny_run):
    records = read_metrics(tiny_run)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "train/tokens_seen"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
    assert train[-1]["train/tokens_seen"] == STEPS * 16 * 32  # global batch x seq_len per step
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


def test_export_loads_in_transformers_with_the_trained_logits(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "export"
    zerotrain("export", tiny_run, out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The engine's live module weights at the last save, as DeepSpeed wrote them.
    live = torch.load(tiny_run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt",
                      weights_only=False)["module"]
    reference = build_model(load_config(tiny_run / "config.yaml").model, Manifest.load(tiny_data).vocab_size)
    reference.load_state_dict(live)
    inputs = tokenizer("To be, or not to be, that is the question", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference.eval()(**inputs).logits)
    assert tokenizer.decode(inputs["input_ids"][0]) == "To be, or not to be, that is the question"
    again = zerotrain("export", tiny_run, out, check=False)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_resume_auto_continues_with_identical_losses(tiny_run, tiny_data, tmp_path):
    # The run as it stood after its step-6 checkpoint: the later checkpoint never happened.
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000012")
    (resumed / "checkpoints" / "latest").write_text("step_00000006")
    half_written = resumed / "checkpoints" / "step_00000012.partial"  # as a save killed midway leaves it
    half_written.mkdir()
    (half_written / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    zerotrain("train", *tiny_args(resumed, tiny_data), "--resume", "auto")
    original, after = train_losses(tiny_run), train_losses(resumed)
    assert sorted(after) == list(range(1, STEPS + 1))  # steps 7-12 logged once, not twice
    assert [after[s] for s in range(7, STEPS + 1)] == [original[s] for s in range(7, STEPS + 1)]
    assert (resumed / "checkpoints" / "latest").read_text() == "step_00000012"
    assert not half_written.exists() and (resumed / "checkpoints" / "step_00000012" / "rank0.pt").exists()


def test_retention_keeps_the_newest_and_the_milestones(tiny_data, tmp_path):
    run_dir = tmp_path / "kept"
    zerotrain("train", *tiny_args(run_dir, tiny_data, "train.max_steps=8", "checkpoint.every=2",
                                  "checkpoint.keep_last=2", "checkpoint.keep_every=4", "train.eval_every=0"))
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000004", "step_00000006", "step_00000008"]


def test_existing_run_is_never_overwritten(tiny_run, tiny_data):
    before = (tiny_run / "metrics.jsonl").read_bytes()
    result = zerotrain("train", *tiny_args(tiny_run, tiny_data), check=False)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "--resume auto" in result.stderr
    result = zerotrain("train", *tiny_args(tiny_run, tiny_data, "zero.stage=3"), "--nproc", "1", "--resume", "auto",
                       check=False)
    assert result.returncode == 2 and "supported for zero.stage 1 and 2 only" in result.stderr
    assert (tiny_run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_every_zero_stage_trains_like_stage_2(stage, tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / f"stage{stage}"
    zerotrain("train", *tiny_args(run_dir, tiny_data, f"zero.stage={stage}"))
    expected, got = train_losses(tiny_run), train_losses(run_dir)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if stage == 3:  # per-rank parameter shards consolidate to the same model
        zerotrain("export", run_dir, tmp_path / "export3")
        zerotrain("export", tiny_run, tmp_path / "export2")
        ids = torch.arange(1, 20).unsqueeze(0)
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / e)(input_ids=ids).logits for e in ("export3", "export2")]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_a_dead_rank_ends_the_job_quickly(tiny_data, tmp_path):
    run_dir = tmp_path / "doomed"
    args = tiny_args(run_dir, tiny_data, "train.max_steps=100000", "train.warmup_steps=10", "checkpoint.every=0",
                     "train.eval_every=0")
    launcher = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3, launcher)
        victim = _rank_pid(run_dir, rank=1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=120)
        assert time.monotonic() - killed < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1
    assert "zerotrain: rank 1 failed" in stderr and "SIGKILL" in stderr, stderr[-2000:]
    assert _rank_pids(run_dir) == {}  # no rank left behind


def _wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _rank_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the live rank processes of this run (not their DataLoader workers), found in /proc."""
    matches = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"trainer.main" not in cmdline or str(run_dir / "config.yaml").encode() not in cmdline:
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            matches[int(proc.name)] = (int(env[b"RANK"]), parent)
        except (OSError, ValueError, KeyError, IndexError):  # a process that ended meanwhile
            continue
    return {rank: pid for pid, (rank, parent) in matches.items() if parent not in matches}


def _rank_pid(run_dir: Path, rank: int) -> int:
    pids = _rank_pids(run_dir)
    assert rank in pids, pids
    return pids[rank]


MIXTURE = "[{{path: '{c}/[a-p]*_gut.txt', name: early, weight: 3}}, {{path: '{c}/[q-z]*_gut.txt', name: late, weight: 1}}]"


@pytest.fixture(scope="module")
def mixture_data(corpus, tmp_path_factory) -> tuple[str, Path]:
    sources = MIXTURE.format(c=corpus)
    prepared = tmp_path_factory.mktemp("prepared") / "mixture"
    zerotrain("prepare", TINY_CONFIG, "--set", f"data.sources={sources}", "--set", f"data.prepared_dir={prepared}")
    return sources, prepared


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


def test_changed_data_is_refused_on_resume_unless_allowed(tiny_run, mixture_data, tmp_path):
    sources, prepared = mixture_data
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    args = tiny_args(resumed, prepared, f"data.sources={sources}", "train.max_steps=13")
    refused = zerotrain("train", *args, "--resume", "auto", check=False)
    assert refused.returncode == 2 and "corpus or tokenizer changed" in refused.stderr
    zerotrain("train", *args, "--resume", "auto", "--allow-data-change")
    assert train_losses(resumed)[13] > 0
    # The checkpoint now records the data it was trained on: continuing needs no override.
    zerotrain("train", *tiny_args(resumed, prepared, f"data.sources={sources}", "train.max_steps=14"), "--resume", "auto")


def test_streaming_mode_trains_and_resumes_exactly(tiny_data, tmp_path):
    streaming = ["data.mode=streaming", f"tokenizer.path={tiny_data / 'tokenizer'}", "train.max_steps=8",
                 "checkpoint.every=4"]
    run_dir = tmp_path / "stream"
    zerotrain("train", *tiny_args(run_dir, tiny_data, *streaming))
    saved = torch.load(run_dir / "checkpoints" / "step_00000004" / "rank1.pt", weights_only=False)
    assert saved["stream"]["rank"] == 1 and saved["stream"]["world_size"] == 2
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    (resumed / "checkpoints" / "latest").write_text("step_00000004")
    zerotrain("train", *tiny_args(resumed, tiny_data, *streaming), "--resume", "auto")
    original, after = train_losses(run_dir), train_losses(resumed)
    assert [after[s] for s in range(5, 9)] == [original[s] for s in range(5, 9)]
    assert original[8] < original[1]


def test_training_starts_from_an_export(tiny_run, tiny_data, tmp_path):
    zerotrain("export", tiny_run, tmp_path / "export")
    run_dir = tmp_path / "continued"
    zerotrain("train", *tiny_args(run_dir, tiny_data, f"model.init_from={tmp_path / 'export'}", "model.config={}",
                                  "train.max_steps=2", "train.eval_every=0"))
    from_scratch, continued = train_losses(tiny_run), train_losses(run_dir)
    assert continued[1] < from_scratch[1] - 0.4  # it starts where the exported model ended, not at random
    assert continued[1] == pytest.approx(from_scratch[STEPS], abs=0.2)
    wrong = zerotrain("train", *tiny_args(tmp_path / "r2", tiny_data, "model.init_from=/nonexistent",
                                          "model.config={}"), check=False)
    assert wrong.returncode == 2 and "model.init_from: /nonexistent is not a Hugging Face model folder" in wrong.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_and_exits_with_code_3_then_resumes(sig, tiny_data, tmp_path):
    run_dir = tmp_path / "stopped"
    args = tiny_args(run_dir, tiny_data, "train.max_steps=100000", "checkpoint.every=0", "train.eval_every=0")
    launcher = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3, launcher)
        launcher.send_signal(sig)  # as Slurm signals the job step before preemption or the time limit
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 3, stderr[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert f"stopped by {sig.name}; saved {tag}" in stderr
    saved_step = json.loads((run_dir / "checkpoints" / tag / "train_state.json").read_text())["step"]
    assert saved_step >= 3 and max(train_losses(run_dir)) > 0
    assert _rank_pids(run_dir) == {}
    if sig == signal.SIGTERM:  # the saved run continues from where it stopped
        zerotrain("train", *tiny_args(run_dir, tiny_data, f"train.max_steps={saved_step + 1}", "checkpoint.every=0",
                                      "train.eval_every=0"), "--resume", "auto")
        assert saved_step + 1 in train_losses(run_dir)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(damage, tiny_run, tiny_data, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    shard = resumed / "checkpoints" / "step_00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        if damage == "truncated":
            f.truncate(shard.stat().st_size - 100)
        else:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
    result = zerotrain("train", *tiny_args(resumed, tiny_data), "--resume", "auto")
    problem = "fails its checksum" if damage == "flipped byte" else "bytes, expected"
    assert f"step_00000012 is damaged ({shard} " in result.stderr and problem in result.stderr
    original, after = train_losses(tiny_run), train_losses(resumed)
    assert [after[s] for s in range(7, STEPS + 1)] == [original[s] for s in range(7, STEPS + 1)]


@pytest.mark.parametrize("stage,ranks", [(2, 1), (1, 3)])
def test_resume_on_another_number_of_ranks(stage, ranks, tiny_data, tmp_path):
    """Saved by 2 ranks, resumed by 1 or 3: universal checkpoint, same global batch, data continues exactly."""
    settings = [f"zero.stage={stage}", "train.global_batch_size=24", "train.max_steps=8", "checkpoint.every=4",
                "train.eval_every=0"]  # 24 = 2 x 4 x 3 = 1 x 4 x 6 = 3 x 4 x 2
    original = tmp_path / "original"
    zerotrain("train", *tiny_args(original, tiny_data, *settings))
    resumed = tmp_path / "resumed"
    shutil.copytree(original, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    result = zerotrain("train", *tiny_args(resumed, tiny_data, *settings), "--nproc", str(ranks), "--resume", "auto")
    assert f"saved by 2 ranks; converting it to a universal checkpoint for {ranks}" in result.stdout
    expected, got = train_losses(original), train_losses(resumed)
    assert [got[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)], abs=1e-5)
    assert json.loads((resumed / "checkpoints" / "step_00000008" / "train_state.json").read_text())[
        "consumed_samples"] == 8 * 24
