"""Checkpoints under real failures: kills at random points and during saves, signals, damage, other world sizes.

Every run here is compared with an uninterrupted one: losses after a resume must be the same bits on CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    STEPS, VICTIMS, as_of_step_6, end, endless_args, kill, last_step, live_ranks, rank_pid, read_metrics, refused,
    start, tiny_args, train_losses, training, wait_for, zerotrain
)
from ranks import free_port

pytestmark = pytest.mark.slow


def test_resume_auto_continues_with_identical_losses(tiny_run, tiny_data, tmp_path):
    # The run as it stood after its step-6 checkpoint: the later checkpoint never happened.
    resumed = as_of_step_6(tiny_run, tmp_path / "resumed")
    half_written = resumed / "checkpoints" / "step_00000012.partial"  # as a save killed midway leaves it
    half_written.mkdir()
    (half_written / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    zerotrain("train", *tiny_args(resumed, tiny_data), "--resume", "auto")
    original, after = train_losses(tiny_run), train_losses(resumed)
    assert sorted(after) == list(range(1, STEPS + 1))  # steps 7-12 logged once, not twice
    assert [after[s] for s in range(7, STEPS + 1)] == [original[s] for s in range(7, STEPS + 1)]
    assert (resumed / "checkpoints" / "latest").read_text() == "step_00000012"
    assert not half_written.exists() and (resumed / "checkpoints" / "step_00000012" / "rank0.pt").exists()


def test_saves_in_place_write_what_background_saves_write(tiny_run, tiny_data, tmp_path):
    """checkpoint.async (the default, what tiny_run did) against checkpoint.async: false: the same losses and the
    same tensors in every file of every checkpoint, and each resumes the other's way."""
    in_place = tmp_path / "in-place"
    zerotrain("train", *tiny_args(in_place, tiny_data, "checkpoint.async=false"))
    assert train_losses(in_place) == train_losses(tiny_run)
    for tag in ("step_00000006", "step_00000012"):
        names = sorted(p.name for p in (tiny_run / "checkpoints" / tag).glob("*.pt"))
        assert names == sorted(p.name for p in (in_place / "checkpoints" / tag).glob("*.pt"))
        for name in names:
            a, b = (torch.load(run / "checkpoints" / tag / name, weights_only=False) for run in (tiny_run, in_place))
            assert same_tensors(a, b), (tag, name)


def same_tensors(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a if k != "ds_config")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return True


def test_kills_at_random_points_then_resume_give_the_uninterrupted_losses(tiny_run, tiny_data, tmp_path):
    """One run killed three times (SIGKILL of a rank, of every rank, of the launcher) at random steps and resumed
    each time: its losses are the uninterrupted run's, bit for bit, and no step is logged twice."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    run_dir = tmp_path / "killed"
    args = tiny_args(run_dir, tiny_data, "checkpoint.every=3")  # saving more often must not change a loss either
    for kill_step, victim in zip(sorted(rng.sample(range(2, STEPS), 3)), rng.sample(VICTIMS, 3)):
        started = time.time()
        launcher = start("train", *args, "--resume", "auto")
        try:
            wait_for(lambda: last_step(run_dir, since=started) >= kill_step, launcher, poll=0.005)  # noqa: B023
            time.sleep(rng.uniform(0, 0.05))  # a step takes ~0.07 s: anywhere in forward, backward, update, save
            kill(victim, launcher, run_dir)
            launcher.wait(timeout=60)
        finally:
            end(launcher)
        assert live_ranks(run_dir) == {}, f"ranks outlived the kill of {victim} (seed {seed})"
    zerotrain("train", *args, "--resume", "auto")
    assert train_losses(run_dir) == train_losses(tiny_run), f"seed {seed}"
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"seed {seed}"


# A model big enough that a save takes a while (~10M parameters, 160 MB of checkpoint at ZeRO 2).
BIGGER = ["model.config.hidden_size=512", "model.config.intermediate_size=1024", "model.config.num_hidden_layers=4",
          "model.config.num_attention_heads=8", "model.config.num_key_value_heads=8", "train.max_steps=6",
          "checkpoint.every=2", "eval.every=0"]


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    zerotrain("train", *tiny_args(reference, tiny_data, *BIGGER))
    killed_mid_save = 0
    for trial, (victim, delay) in enumerate([("every rank", 0.0), ("the launcher", 0.1),
                                             ("every rank", 0.3)]):
        run_dir = tmp_path / f"trial{trial}"
        launcher = start("train", *tiny_args(run_dir, tiny_data, *BIGGER))
        partial = run_dir / "checkpoints" / "step_00000004.partial"
        try:
            wait_for(partial.exists, launcher, poll=0.001)
            time.sleep(delay)
            kill(victim, launcher, run_dir)
            launcher.wait(timeout=60)
        finally:
            end(launcher)
        killed_mid_save += partial.exists()
        latest = (run_dir / "checkpoints" / "latest").read_text()
        assert latest in ("step_00000002", "step_00000004"), latest  # never a half-written one
        result = zerotrain("train", *tiny_args(run_dir, tiny_data, *BIGGER), "--resume", "auto")
        assert "damaged" not in result.stderr
        assert train_losses(run_dir) == train_losses(reference), f"trial {trial}: {victim} after {delay} s"
        assert not partial.exists()
    assert killed_mid_save >= 2, "the kills missed the saves: the test proved nothing"


def test_retention_keeps_the_newest_and_the_milestones(tiny_data, tmp_path):
    run_dir = tmp_path / "kept"
    zerotrain("train", *tiny_args(run_dir, tiny_data, "train.max_steps=8", "checkpoint.every=2",
                                  "checkpoint.keep_last=2", "checkpoint.keep_every=4", "eval.every=0"))
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000004", "step_00000006", "step_00000008"]


def test_existing_run_is_never_overwritten(tiny_run, tiny_data):
    before = (tiny_run / "metrics.jsonl").read_bytes()
    result = refused("train", *tiny_args(tiny_run, tiny_data))
    assert "already holds checkpoints" in result.stderr and "--resume auto" in result.stderr
    assert (tiny_run / "metrics.jsonl").read_bytes() == before


def test_a_dead_rank_ends_the_job_quickly(tiny_data, tmp_path):
    run_dir = tmp_path / "doomed"
    with training(endless_args(run_dir, tiny_data, "optim.warmup_steps=10"), run_dir, until=3) as launcher:
        os.kill(rank_pid(run_dir, rank=1), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=120)
        assert time.monotonic() - killed < 60
    assert launcher.returncode == 1
    assert "zerotrain: rank 1 failed" in stderr and "SIGKILL" in stderr, stderr[-2000:]
    assert live_ranks(run_dir) == {}  # no rank left behind


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_and_exits_with_code_3_then_resumes(sig, tiny_data, tmp_path):
    run_dir = tmp_path / "stopped"
    args = endless_args(run_dir, tiny_data)
    with training(args, run_dir, until=3) as launcher:
        launcher.send_signal(sig)  # as Slurm signals the job step before preemption or the time limit
        _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 3, stderr[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert f"stopped by {sig.name}; saved {tag}" in stderr
    saved_step = json.loads((run_dir / "checkpoints" / tag / "train_state.json").read_text())["step"]
    assert saved_step >= 3 and max(train_losses(run_dir)) > 0
    assert live_ranks(run_dir) == {}
    if sig == signal.SIGTERM:  # the saved run continues from where it stopped
        zerotrain("train", *tiny_args(run_dir, tiny_data, f"train.max_steps={saved_step + 1}", "checkpoint.every=0",
                                      "eval.every=0"), "--resume", "auto")
        assert saved_step + 1 in train_losses(run_dir)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_run, tiny_data, tmp_path):
    """A truncated file fails the pre-flight's size check: it decides on step 6. A flipped byte passes it (the
    pre-flight checks sizes of large files): the ranks, checksumming the chosen step 12 together, find it and fall
    back themselves. Both continue from step 6 as the uninterrupted run did (to step 13, so that the run is not over
    before the ranks look), and alike."""
    losses = {}
    for damage in ("truncated", "flipped byte"):
        resumed = shutil.copytree(tiny_run, tmp_path / damage)
        shard = resumed / "checkpoints" / "step_00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        with open(shard, "r+b") as f:
            if damage == "truncated":
                f.truncate(shard.stat().st_size - 100)
            else:
                f.seek(1000)
                byte = f.read(1)
                f.seek(1000)
                f.write(bytes([byte[0] ^ 0xFF]))
        result = zerotrain("train", *tiny_args(resumed, tiny_data, "train.max_steps=13"), "--resume", "auto")
        if damage == "truncated":  # the pre-flight's note
            assert f"zerotrain: checkpoint step_00000012 is damaged ({shard} has " in result.stdout
        else:  # the ranks' log: the pre-flight chose step 12
            assert f"checkpoint step_00000012 is damaged ({shard} fails its checksum): falling back" in result.stderr
            assert "step_00000012 is damaged" not in result.stdout
        losses[damage] = train_losses(resumed)
    assert sorted(losses["truncated"]) == list(range(1, 14)) and losses["truncated"] == losses["flipped byte"]
    # 13 steps schedule their learning rate otherwise than 12 from step 7 on: its loss is the last one alike
    assert losses["truncated"][7] == train_losses(tiny_run)[7]


def _convert_as_rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    from trainer.engine.universal import convert

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    convert(Path(folder), Path(out), dist.group.WORLD, lambda message: None)
    dist.destroy_process_group()


def test_the_ranks_convert_to_universal_as_deepspeeds_command_does(tiny_run, tmp_path):
    """Each of 3 ranks converts its share (saved ranks, then parameters by size): the same tensors as
    `ds_to_universal` writes alone."""
    folder = tiny_run / "checkpoints" / "step_00000012"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                    "--output_folder", str(tmp_path / "command"), "--inject_missing_state"], check=True,
                   capture_output=True)
    torch.multiprocessing.spawn(_convert_as_rank, args=(3, free_port(), str(folder), str(tmp_path / "ranks")),
                                nprocs=3)
    files = {p.relative_to(tmp_path / "command") for p in (tmp_path / "command" / "zero").rglob("*.pt")}
    assert files and files == {p.relative_to(tmp_path / "ranks") for p in (tmp_path / "ranks" / "zero").rglob("*.pt")}
    for name in files:
        assert same_tensors(*(torch.load(tmp_path / side / name, weights_only=False) for side in ("command", "ranks")))


# Every stage on fewer and on more ranks would take 8 runs: each stage gets one direction here. test_weights resumes
# a bf16 run of every stage on 1 rank besides, and test_lora an fp32 stage-3 run (its base frozen).
@pytest.mark.parametrize("stage,rank_counts", [(0, (4,)), (1, (1,)), (2, (4,)), (3, (4,))])
def test_resume_on_another_number_of_ranks(stage, rank_counts, stage_run, tiny_data, tmp_path):
    """Saved by 2 ranks at step 6, resumed by 1 or 4: same global batch, optimizer state carried over, data
    exactly-once."""
    original = stage_run(stage)
    expected = train_losses(original)
    for ranks in rank_counts:  # 16 = 2 x 4 x 2 = 1 x 4 x 4 = 4 x 4 x 1
        resumed = as_of_step_6(original, tmp_path / f"resumed-on-{ranks}")
        result = zerotrain("train", *tiny_args(resumed, tiny_data, f"zero.stage={stage}"), "--nproc", str(ranks),
                           "--resume", "auto")
        assert f"saved by 2 ranks; resuming on {ranks}" in result.stdout
        # Stage 0 saves the optimizer whole; ZeRO partitions go through a universal checkpoint.
        assert ("universal checkpoint" in result.stdout) == (stage > 0)
        got = train_losses(resumed)
        # fp32 reduction order differs with the number of ranks: the notes measured up to 1e-6.
        assert [got[s] for s in range(7, STEPS + 1)] == pytest.approx([expected[s] for s in range(7, STEPS + 1)],
                                                                      abs=1e-5)
        assert json.loads((resumed / "checkpoints" / "step_00000012" / "train_state.json").read_text())[
            "consumed_samples"] == STEPS * 16


def test_changed_data_is_refused_on_resume_unless_allowed(tiny_run, mixture_data, tmp_path):
    sources, prepared = mixture_data
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    args = tiny_args(resumed, prepared, f"data.sources={sources}", "train.max_steps=13")
    assert "corpus or tokenizer changed" in refused("train", *args, "--resume", "auto").stderr
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


def test_a_resumed_run_follows_the_schedule_its_config_describes(tiny_run, tiny_data, tmp_path):
    """optim.* and train.max_steps may change on resume, and then they do: the learning rate of every resumed step
    is the changed schedule's at that step (the checkpoint gives the weights and Adam's moments, not the lr)."""
    from trainer.optim import warmup_cosine

    resumed = as_of_step_6(tiny_run, tmp_path / "resumed")
    zerotrain("train", *tiny_args(resumed, tiny_data, "optim.lr=1e-3", "optim.warmup_steps=8",
                                  "optim.min_lr_ratio=0.5", "train.max_steps=14"), "--resume", "auto")
    factor = warmup_cosine(8, 14, 0.5)  # the lr of step k is lr x factor(k - 1): k - 1 updates done before it
    logged = {r["step"]: r["train/lr"] for r in read_metrics(resumed) if "train/lr" in r and r["step"] > 6}
    assert logged == pytest.approx({step: 1e-3 * factor(step - 1) for step in range(7, 15)}, rel=1e-6)
