"""Nothing lost, nothing silent: what a careless or hostile user can do to a run, and what zerotrain does about it
(docs/reliability.md). Real processes, real kills, a real full disk (a small tmpfs, where the test may mount one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from transformers import AutoModelForCausalLM

from helpers import (
    REPO, STEPS, TINY, diverging, endless_args, last_step, live_ranks, one_line_error, rank_pids, read_metrics, refused, running,
    tiny_args, train_losses, training, wait_for, zerotrain
)
from trainer.config import ConfigError, load_config
from trainer.model.build import model_config
from trainer.model.shape import run_on_meta
from trainer.tasks import TASKS

slow = pytest.mark.slow


def flip_byte(path: Path, offset: int | None = None) -> None:
    offset = path.stat().st_size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text(TINY.read_text().replace("  max_steps: 12\n", "  max_steps: 4\n  max_steps: 9999\n"))
    line = TINY.read_text().splitlines().index("  max_steps: 12") + 1
    with pytest.raises(ConfigError, match=rf"twice.yaml: train.max_steps is written twice \(lines {line} and "
                                          rf"{line + 1}\); keep one$"):
        load_config(config)
    config.write_text(TINY.read_text() + "\nyes: 1\ntrue: 2\n")  # one key as YAML reads them
    with pytest.raises(ConfigError, match="True is written twice"):
        load_config(config)


@pytest.mark.parametrize("override,message", [
    ("run.output_dir=", "run.output_dir: an empty path"),
    ("data.prepared_dir=  ", "data.prepared_dir: an empty path"),
    ("data.sources=['']", "data.sources.0: an empty path"),
    ("train.max_steps=[1,", "--set train.max_steps: line 1 not valid YAML"),
    ("train.lr=1e-3", "train.lr: moved to optim.lr"),
    ("train.eval_every=5", "train.eval_every: moved to eval.every"),
    ("run.name=" + "x y" * 2000, "run.name: string should match pattern"),
    ("train.max_steps=" + "[" * 5000 + "]" * 5000, "--set train.max_steps: nested too deeply to be a config"),
    ("optim.lr=1e30", "optim.lr: input should be less than or equal to 1"),
    ("optim.lr=.nan", "optim.lr: input should be a finite number"),
    ("optim.betas=[0.9, 1.0]", "optim.betas.1: input should be less than 1"),
    ("run.seed=-1", "run.seed: input should be greater than or equal to 0"),
    ("launch.collective_timeout=99999999999999999", "launch.collective_timeout: input should be less than or equal"),
])
def test_bad_values_are_one_short_line(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [override])
    assert str(error.value).startswith(message) and len(str(error.value)) < 300, str(error.value)


def test_shapes_transformers_accepts_but_cannot_run_are_named_before_any_rank(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    for overrides, message in ((["data.seq_len=100"], "data.seq_len: 100 exceeds the model's position limit (64"),
                               (["model.config.num_key_value_heads=4", "model.config.num_attention_heads=6",
                                 "model.config.hidden_size=48"],
                                "model.config.num_key_value_heads: 4 does not divide num_attention_heads (6)")):
        one_line_error(refused("train", *tiny_args(run_dir, tiny_data, *overrides)), message)
    assert not run_dir.exists()


def test_any_shape_the_model_cannot_run_fails_on_the_meta_device_naming_the_config():
    """The safety net behind the named checks: key/value heads that do not divide the attention heads, run on the
    meta device (no memory), fail in the forward pass."""
    cfg = load_config(TINY, ["model.config.num_attention_heads=6", "model.config.num_key_value_heads=4",
                             "model.config.hidden_size=48"])
    inputs = TASKS["causal_lm"].meta_inputs(4, 32)
    with pytest.raises(ConfigError, match=r"^model.config: the model cannot run 4 x 32 tokens: tried on the meta "
                                          r"device before any rank starts, it fails with: The size of tensor"):
        run_on_meta(AutoModelForCausalLM, model_config(cfg.model, 512), inputs)
    # Mixtures of experts: the trial's experts kernel has meta kernels for every dtype (the run's may not)
    experts = load_config(TINY, ["model.type=mixtral", "model.config.num_local_experts=4"]).model
    run_on_meta(AutoModelForCausalLM, model_config(experts, 512), inputs)
    too_many = load_config(TINY, ["model.type=qwen3_moe", "model.config.num_experts=4",
                                  "model.config.num_experts_per_tok=8"]).model  # each token routed to 8 of 4
    with pytest.raises(ConfigError, match=r"^model.config: the model cannot run 4 x 32 tokens: .* k not in range"):
        run_on_meta(AutoModelForCausalLM, model_config(too_many, 512), inputs)


def test_a_missing_or_truncated_shard_is_named_before_any_rank(tiny_data, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_data, prepared)
    shard = next(prepared.rglob("*-train_00000.bin"))
    os.truncate(shard, shard.stat().st_size - 2)
    one_line_error(refused("train", *tiny_args(tmp_path / "run", prepared)), f"{shard}: truncated or wrong size")
    shard.unlink()
    one_line_error(refused("train", *tiny_args(tmp_path / "run", prepared)), f"{shard}: missing")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(psutil.virtual_memory().total > 40 * 2**30, reason="the case is a 24 GB machine's")
def test_a_run_that_cannot_fit_in_memory_is_refused_naming_what_would(tiny_data, tmp_path):
    """The 1B preset at ZeRO 3 on 2 CPU ranks of this 24 GB machine (on the tiny data): OOM-killed after minutes
    before; now refused before any rank starts, with the estimate."""
    result = zerotrain("train", REPO / "configs" / "llama_1b.yaml", "--nproc", "2", *[a for s in (
        f"run.output_dir={tmp_path / 'run'}", f"data.prepared_dir={tiny_data}", "data.sources=[x.txt]",
        "zero.stage=3", "data.num_workers=0", "train.micro_batch_size=1", "train.global_batch_size=16")
        for a in ("--set", s)], check=False)  # a new process: DeepSpeed, imported for the estimate, adds no line
    one_line_error(result, "zero.stage: ZeRO-3 needs about ")
    assert "of this machine's memory" in result.stderr and ("would fit" in result.stderr or "no ZeRO stage fits"
                                                             in result.stderr)
    assert not (tmp_path / "run").exists()


@slow  # real `zerotrain prepare` runs (a pool of tokenizer processes)
def test_bad_sources_name_the_file_and_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    for source, message in ((rows, f"{rows}: line 2 is not valid JSON"), (binary, f"{binary}: not UTF-8 text")):
        result = zerotrain("prepare", TINY, "--set", f"data.sources=['{source}']", "--set",
                           f"data.prepared_dir={tmp_path / source.stem}", check=False)
        one_line_error(result, message)


@slow
def test_cli_misuse_is_one_line(tiny_run, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    one_line_error(refused("train", TINY, "--set", f"run.output_dir={afile}"),
                   f"run.output_dir: {afile} is a file, not a folder")
    one_line_error(zerotrain("export", tiny_run, afile, check=False), f"{afile}: exists and is not an empty folder")
    one_line_error(zerotrain("export", tiny_run, tmp_path / "x", "--tag", "step_1; rm -rf /", check=False),
                   "--tag: 'step_1; rm -rf /' is not a checkpoint")
    export = tmp_path / "export"
    zerotrain("export", tiny_run, export)
    one_line_error(zerotrain("generate", export, "--prompt", "", check=False), "--prompt: an empty prompt")
    for flags, message in ((["--temperature", "0"], "argument --temperature: must be a number more than 0"),
                           (["--temperature", "-1"], "argument --temperature: must be a number more than 0"),
                           (["--temperature", "nan"], "argument --temperature: must be a number more than 0"),
                           (["--seed", "99999999999999999999999"], "argument --seed: must be from 0 to 2**32 - 1"),
                           (["--max-new-tokens", "100000"], "--max-new-tokens: 100000 after a prompt of 2 tokens "
                                                            "exceeds the model's 64 positions; at most 62 here")):
        one_line_error(zerotrain("generate", export, "--prompt", "To be", *flags, check=False), message)
    binary = tmp_path / "binary"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line_error(zerotrain("predict", export, "--input", binary, check=False), f"--input: {binary} is not UTF-8")


# ---------------------------------------------------------------------------------------------------------------
# every reader of a checkpoint verifies it as resume does


@slow
def test_export_and_status_take_only_an_intact_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    flip_byte(run / "checkpoints" / "step_00000012" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    exported = zerotrain("export", run, tmp_path / "export")
    assert "checkpoint step_00000012 is damaged" in exported.stderr and "fails its checksum" in exported.stderr
    assert "exported an older one" in exported.stderr
    one_line_error(zerotrain("export", run, tmp_path / "x", "--tag", "step_00000012", check=False),
                   f"{run}: no intact checkpoint to export (step_00000012 is damaged (")
    (run / "checkpoints" / "latest").write_bytes(b"\x00\xffgarbage")  # a pointer that names nothing
    status = zerotrain("status", run).stdout
    assert "step_00000012 is damaged" in status and f"last checkpoint: {run / 'checkpoints' / 'step_00000006'}" \
        in status
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train/lo')  # what a kill in the middle of a write leaves
    assert "step 12/12" in zerotrain("status", run).stdout


@slow
def test_damaged_run_files_are_named_or_fallen_back_from_never_a_traceback(tiny_run, tmp_path):
    """Every JSON file of a run directory is read through its schema (trainer/run_files.py), and a checkpoint's
    files are checked against its manifest before any is parsed."""
    from trainer.checkpointing import resume

    run = shutil.copytree(tiny_run, tmp_path / "run")
    state = run / "checkpoints" / "step_00000012" / "train_state.json"
    state.write_bytes(b"\xff" * state.stat().st_size)  # garbage of the same size: only its checksum tells
    point = resume.decide(run, load_config(run / "config.yaml").layout)  # what `train --resume auto` decides
    assert point.tag == "step_00000006" and f"{state} fails its checksum" in point.damaged[0]
    (run / "summary.json").write_text("[1, 2]")
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs").write_text("")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train/loss": 5.0}\n')  # a record without throughput
    status = zerotrain("status", run).stdout
    assert f"{run / 'summary.json'} is not a run summary" in status and "step 13/12" in status
    assert f"last checkpoint: {run / 'checkpoints' / 'step_00000006'}" in status
    (run / "summary.json").write_text('{"step": 12, "tokens_seen": 1, "tokens_per_s": "fast"}')
    (run / "slurm" / "jobs").write_text("12\nrm -rf /\n")
    status = zerotrain("status", run).stdout
    assert "tokens_per_s: Input should be a valid number" in status and "slurm/jobs: damaged" in status
    older = run / "checkpoints" / "step_00000006"
    (older / "manifest.json").write_text("{}")  # a manifest that lists nothing, the files it would list gone
    for tensors in older.glob("*.pt"):
        tensors.unlink()
    assert f"{older / 'manifest.json'} does not list train_state.json" in zerotrain("status", run).stdout
    one_line_error(zerotrain("export", run, tmp_path / "export", check=False),
                   f"{run}: no intact checkpoint to export (step_00000012 is damaged (")
    (older / "manifest.json").write_text("[]")
    assert f"{older / 'manifest.json'} is not a checkpoint manifest" in zerotrain("status", run).stdout


# ---------------------------------------------------------------------------------------------------------------
# one job per run directory


@slow
def test_a_second_job_on_the_same_run_directory_is_refused_and_a_killed_ones_lock_is_stale(tiny_data, tmp_path):
    run_dir = tmp_path / "shared"
    args = endless_args(run_dir, tiny_data, "checkpoint.every=2")
    with training(args, run_dir, until=3) as first:
        second = refused("train", *args, "--resume", "auto")
        one_line_error(second, f"run.output_dir: {run_dir} is in use by another job (host ")
        assert f"pid {first.pid}, since " in second.stderr
        first.kill()  # SIGKILL: no clean release; its ranks die with it
        first.wait()
    assert live_ranks(run_dir) == {}
    saved = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text() /
                        "train_state.json").read_text())["step"]
    resumed = zerotrain("train", *tiny_args(run_dir, tiny_data, f"train.max_steps={saved + 2}", "checkpoint.every=2",
                                            "eval.every=0"), "--resume", "auto")
    assert "ended without releasing it (killed?); taking over" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 2  # one writer: each step once, in order


# ---------------------------------------------------------------------------------------------------------------
# a config changed between resumes


@slow
def test_resume_refuses_what_cannot_continue_before_anything_is_written(tiny_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config_before = (run / "config.yaml").read_bytes()
    for overrides, message in (
            (["data.seq_len=16"], "checkpoint step_00000012 was trained with other settings that cannot change on "
                                  "resume: data.seq_len 32 -> 16;"),
            (["model.config.hidden_size=128", "run.seed=8"], "checkpoint step_00000012 was trained with other "
             "settings that cannot change on resume: model.config.hidden_size 64 -> 128; run.seed 7 -> 8;"),
            (["train.max_steps=4"], "train.max_steps: 4 is below the step of checkpoint step_00000012 (12)"),
            (["train.global_batch_size=40"], "train.global_batch_size: 40 does not divide the 192 samples")):
        one_line_error(refused("train", *tiny_args(run, tiny_data, *overrides), "--resume", "auto"),
                       message)
        assert (run / "config.yaml").read_bytes() == config_before
    finished = zerotrain("train", *tiny_args(run, tiny_data), "--resume", "auto")
    assert "already reached train.max_steps (12)" in finished.stdout
    # What may change: the learning rate, the length of the run, the cadences
    zerotrain("train", *tiny_args(run, tiny_data, "train.max_steps=14", "optim.lr=1e-3", "eval.every=0",
                                  "checkpoint.every=1", "train.log_every=2"), "--resume", "auto")
    assert max(train_losses(run)) == 14


# ---------------------------------------------------------------------------------------------------------------
# data damaged after prepare


@slow
def test_a_shard_corrupted_after_prepare_stops_every_rank_naming_it(tiny_data, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_data, prepared)
    shard = next(prepared.rglob("*-train_00000.bin"))
    flip_byte(shard, offset=shard.stat().st_size // 4 * 2)  # a low byte: the token stays in the 512-token vocabulary
    # and the size is intact: only the checksum can tell
    result = zerotrain("train", *tiny_args(tmp_path / "run", prepared), check=False)
    assert result.returncode == 1
    for rank in (0, 1):
        assert f"zerotrain: rank {rank} failed (exit code 1): DataError: {shard}: checksum mismatch" in result.stderr
    assert last_step(tmp_path / "run") < STEPS


# ---------------------------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at tmp_path/disk, resizable with resize(bytes), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the disk-full cases cannot be made here")

    def resize(nbytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(mount_point)], check=True)

    yield mount_point, resize
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@slow
def test_a_full_disk_during_a_save_is_named_and_the_previous_checkpoint_resumes(tiny_run, tiny_data, small_disk):
    disk, resize = small_disk
    run_dir = disk / "run"
    # room for the whole run but half of its last checkpoint
    resize(tree_bytes(tiny_run) - tree_bytes(tiny_run / "checkpoints" / "step_00000012") // 2)
    result = zerotrain("train", *tiny_args(run_dir, tiny_data), check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "checkpoint.keep_last: 4 checkpoints of" in result.stdout  # warned at start
    assert "JSONDecodeError" not in result.stderr
    assert f"zerotrain: the disk holding {run_dir} is full" in result.stderr
    assert "the last complete checkpoint (step_00000006) is intact" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    resize(64 * 2**20)
    zerotrain("train", *tiny_args(run_dir, tiny_data), "--resume", "auto")
    assert train_losses(run_dir) == train_losses(tiny_run)


@slow  # real `zerotrain prepare` runs (a pool of tokenizer processes)
def test_a_full_disk_during_prepare_is_one_line_and_prepare_resumes(corpus, small_disk):
    disk, resize = small_disk
    resize(300 * 2**10)  # the tokenizer fits, the shards do not
    prepared = disk / "prepared"
    result = zerotrain("prepare", TINY, "--set", f"data.prepared_dir={prepared}", check=False)
    one_line_error(result, f"data.prepared_dir: the disk holding {prepared} is full")
    resize(64 * 2**20)
    zerotrain("prepare", TINY, "--set", f"data.prepared_dir={prepared}")
    assert (prepared / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# signals


def sigint_until(run_dir: Path, launcher: subprocess.Popen, times: int, gap: float) -> str:
    for i in range(times):
        launcher.send_signal(signal.SIGINT)
        if i + 1 < times:
            time.sleep(gap)
    _, stderr = launcher.communicate(timeout=120)
    return stderr


@slow
def test_ctrl_c_saves_and_stops_and_a_second_stops_at_once(tiny_data, tmp_path):
    run_dir = tmp_path / "interrupted"
    args = endless_args(run_dir, tiny_data)
    with training(args, run_dir, until=2) as launcher:
        stderr = sigint_until(run_dir, launcher, times=1, gap=0)
    assert launcher.returncode == 3 and "Traceback" not in stderr, stderr[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert f"zerotrain: stopped by Ctrl-C; saved {tag}: continue with --resume auto" in stderr
    assert live_ranks(run_dir) == {}
    # Twice, while the ranks are still starting: the second stops them at once, before any save.
    log = run_dir / "logs" / "rank0.log"
    logged = log.stat().st_size
    with running("train", *args, "--resume", "auto") as again:
        wait_for(lambda: log.stat().st_size > logged, again, poll=0.05)  # the ranks handle signals from here on
        stderr = sigint_until(run_dir, again, times=2, gap=0.3)
    assert again.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "zerotrain: second Ctrl-C: stopped at once, without saving" in stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert live_ranks(run_dir) == {}


@slow
def test_a_stop_on_a_non_finite_step_saves_nothing_and_says_so(tiny_data, tmp_path):
    run_dir = tmp_path / "diverging"
    args = endless_args(run_dir, tiny_data, "zero.stage=0", "train.max_nonfinite_steps=100000")
    with training(args, run_dir, until=5, env=diverging(after=4)) as launcher:  # NaN from step 3 on
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, stderr[-3000:]
    assert "whose loss is not finite: nothing was saved" in stderr
    assert "nothing was saved since the signal" in stderr and not (run_dir / "checkpoints" / "latest").exists()


# ---------------------------------------------------------------------------------------------------------------
# memory


@slow
def test_loader_workers_do_not_hold_the_ranks_model_states(tiny_data, tmp_path):
    """Forked before the model exists, a worker shares none of the rank's later pages (forked after, each held a
    copy of the rank's old pages: 3 GB per worker at 0.55B)."""
    run_dir = tmp_path / "workers"
    args = endless_args(run_dir, tiny_data, "model.config.hidden_size=768", "model.config.intermediate_size=2048",
                        "model.config.num_hidden_layers=8", "model.config.num_attention_heads=12",
                        "model.config.num_key_value_heads=12", "zero.stage=0", "data.num_workers=1")
    try:
        with running("train", *args) as launcher:
            wait_for(lambda: last_step(run_dir) >= 2, launcher, timeout=300)
            ranks = rank_pids(run_dir)
            workers = {rank: [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
                       for rank, pid in ranks.items()}
            anon = {rank: (rss_anon(pid), max(rss_anon(w) for w in workers[rank])) for rank, pid in ranks.items()}
    finally:
        live_ranks(run_dir)
    for rank, (rank_bytes, worker_bytes) in anon.items():
        assert rank_bytes > 2**30 and worker_bytes < rank_bytes / 3, anon  # 57M parameters in fp32: 0.9 GB of states


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for {pid}")
